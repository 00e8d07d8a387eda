"""kuberay/alerts.yaml: valid rules (promtool check rules), each tested firing and quiet
(promtool test rules), on metrics that exist, each with its runbook in docs/monitoring.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from cicd_ray.master.metrics import NAMES

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "kuberay" / "alerts.yaml"
RULE_TESTS = ROOT / "tests" / "unit" / "alerts" / "alerts_test.yaml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: ./dev test installs Debian's prometheus package"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_the_rules_are_valid():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_every_alert_fires_and_stays_quiet_as_its_rule_tests_say():
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def _named(text: str) -> set[str]:
    return set(re.findall(r'(?:pool|worker)="([^"]+)"', text))


def test_every_alert_has_a_firing_and_a_quiet_case():
    """Quiet: a check expecting no alert, or a series of its test (a pool, a worker) that
    the firing check expects no alert for."""
    cases: dict[str, set[str]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        named = set().union(*(_named(s["series"]) for s in test["input_series"]))
        for check in test["alert_rule_test"]:
            found = cases.setdefault(check["alertname"], set())
            fired = {
                v
                for e in check["exp_alerts"]
                for k, v in e["exp_labels"].items()
                if k in ("pool", "worker")
            }
            found.add("fires" if check["exp_alerts"] else "quiet")
            if check["exp_alerts"] and named - fired:
                found.add("quiet")
    assert cases == {a["alert"]: {"fires", "quiet"} for a in alerts()}


def test_the_rules_query_only_metrics_that_exist():
    for rule in alerts():
        queried = set(re.findall(r"\bray_(cicd_\w+)", rule["expr"]))
        assert queried, rule["alert"]
        for name in queried:
            assert re.sub(r"_(bucket|sum|count)$", "", name) in NAMES, (rule["alert"], name)


def test_every_alert_has_its_runbook_in_the_monitoring_guide():
    guide = (ROOT / "docs" / "monitoring.md").read_text(encoding="utf-8")
    for rule in alerts():
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert f"\n### {rule['alert']}\n" in guide and anchor == rule["alert"].lower()
