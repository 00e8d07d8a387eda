"""What a step cannot reach, and placement that keeps its promises, on the session's real
cluster (its workers run as root, as on KubeRay, so every step has a user of its own)."""

from __future__ import annotations

import contextlib
import itertools
import textwrap
import time
from pathlib import Path

import ray

from cicd_ray.states import StepState
from cicd_ray.worker.isolation import STEP_ROOT
from tests.builders import chain
from tests.integration.conftest import WORKER_SECRET


def _processes_holding(text: str) -> int:
    found = 0
    for env in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            found += text.encode() in env.read_bytes()
    return found


def test_a_step_cannot_read_the_worker_ray_token_or_another_run(harness):
    # As root, the test sees the secret in the workers' environments: the probe could find it.
    assert _processes_holding(WORKER_SECRET) > 0
    other = harness.submit(
        {"name": "other", "steps": [{"name": "holds", "run": "echo private > mine.txt; sleep 4"}]}
    )
    harness.wait_for_step(other, "holds", StepState.RUNNING)
    probe = textwrap.dedent(f"""
        id -u
        grep -l {WORKER_SECRET} /proc/*/environ 2>/dev/null && echo FOUND-WORKER-SECRET
        cat /proc/$PPID/environ >/dev/null 2>&1 && echo READ-SUPERVISOR
        ls /root >/dev/null 2>&1 && echo ENTERED-ROOT
        {{ cat "$(getent passwd root | cut -d: -f6)/.ray/auth_token" 2>&1 || true; }} |
            grep -q 'Permission denied' && echo TOKEN-DENIED
        cat {STEP_ROOT}/*/*/ws/mine.txt 2>/dev/null && echo READ-OTHER-RUN
        ls {STEP_ROOT} >/dev/null 2>&1 && echo LISTED-STEPS
        ls {harness.settings.home} >/dev/null 2>&1 && echo LISTED-HOME
        env | grep -E 'CICD_RAY|RAY_|TOKEN' || true
        echo done
        """)
    view = harness.run({"name": "probe", "steps": [{"name": "probe", "run": probe}]})
    log = harness.log(view["run"]["id"], "probe")
    assert view["run"]["state"] == "succeeded", log
    uid, *rest = log.split()
    assert int(uid) >= 200000
    assert rest == ["TOKEN-DENIED", "done"], log
    assert harness.wait(other)["run"]["state"] == "succeeded"
    attempt = harness.view(view["run"]["id"])["attempts"][0]
    assert attempt["runs_as"] == f"uid {uid}"
    workers = harness.master_workers()
    assert all(
        w["isolation"].startswith("a user per step") for w in workers if w["state"] == "ready"
    )


def test_a_pools_slots_cap_the_steps_on_a_worker(harness):
    """The `solo` pool has one worker of one CPU with `slots: 1`: four quarter-CPU steps
    would fit its CPU at once; they run one after another."""
    view = harness.run(
        {
            "name": "slots",
            "defaults": {"pool": "solo"},
            "steps": [
                {"name": f"s{i}", "resources": {"cpu": 0.25, "memory_mb": 64}, "run": "sleep 0.5"}
                for i in range(4)
            ],
        }
    )
    assert view["run"]["state"] == "succeeded"
    spans = sorted((a["started_at"], a["finished_at"]) for a in view["attempts"])
    assert all(later[0] >= earlier[1] - 0.01 for earlier, later in itertools.pairwise(spans))


def test_a_3000_step_chain_fails_at_its_head_and_the_master_goes_on(harness):
    started = time.monotonic()
    view = harness.run(_as_dict(chain(3000)))
    assert view["run"]["state"] == "failed"
    states = [s["state"] for s in view["steps"]]
    assert states[0] == "failed" and states.count("skipped") == 2999
    assert time.monotonic() - started < 60
    # The master still answers, and runs the next pipeline.
    assert ray.get(harness.master.ping.remote(), timeout=10)["pid"] > 0
    assert (
        harness.run({"name": "next", "steps": [{"name": "a", "run": "true"}]})["run"]["state"]
        == "succeeded"
    )


def _as_dict(text: str) -> dict:
    from cicd_ray.pipeline.yamldoc import load

    return load(text)


def test_workspaces_are_removed_and_the_step_root_stays_closed(harness):
    view = harness.run({"name": "tidy", "steps": [{"name": "a", "run": "touch x"}]})
    assert view["run"]["state"] == "succeeded"
    assert oct(STEP_ROOT.stat().st_mode & 0o777) == "0o711"


def test_a_secret_is_masked_in_the_log_and_absent_from_every_view(harness, api):
    import base64
    import json

    import httpx

    from tests.integration.conftest import API_TOKEN, DEPLOY_KEY

    folder = harness.settings.secrets_dir
    view = harness.run(
        {
            "name": "secret",
            "steps": [
                {
                    "name": "deploy",
                    "secrets": ["DEPLOY_KEY"],
                    "run": 'echo "key: $DEPLOY_KEY"; printf %s "$DEPLOY_KEY" | base64; '
                    'for c in $(echo "$DEPLOY_KEY" | fold -w 8); do printf %s "$c"; sleep 0.05; '
                    "done; echo",
                },
                {
                    "name": "other",
                    "run": f'echo "${{DEPLOY_KEY:-unset}}"; '
                    f"cat {folder}/default/DEPLOY_KEY 2>/dev/null || echo DENIED",
                },
            ],
        }
    )
    assert view["run"]["state"] == "succeeded", view
    run_id = view["run"]["id"]
    assert harness.log(run_id, "deploy") == "key: ***\n***\n***\n"
    assert harness.log(run_id, "other") == "unset\nDENIED\n"
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    seen = [
        httpx.get(f"{api}/api/v1/runs/{run_id}", headers=auth).text,
        httpx.get(f"{api}/api/v1/runs?limit=50", headers=auth).text,
        httpx.get(f"{api}/api/v1/runs/{run_id}/steps/deploy/log", headers=auth).text,
        json.dumps(ray.get(harness.master.events.remote(0, None, 0.1))),
    ]
    for text in seen:
        assert DEPLOY_KEY not in text and base64.b64encode(DEPLOY_KEY.encode()).decode() not in text
    assert harness.step(view, "deploy")["spec"]["secrets"] == ["DEPLOY_KEY"]


def test_a_run_s_own_secret_from_the_cli_is_masked_and_deleted_when_it_ends(
    harness, api, cli, tmp_path
):
    import json

    from cicd_ray.store import open_store
    from tests.integration.conftest import API_TOKEN

    pipeline = tmp_path / "own.yaml"
    pipeline.write_text(
        "name: own-secret\nsteps:\n  - name: use\n    secrets: [RELEASE_TOKEN]\n"
        '    run: echo "token is $RELEASE_TOKEN"\n'
    )
    value = "release-token-" + "q" * 20
    remote = {"CICD_RAY_URL": api, "CICD_RAY_TOKEN": API_TOKEN}
    unset = cli("submit", str(pipeline), "--secret", "RELEASE_TOKEN", **remote)
    assert unset.returncode == 2 and "set the variable RELEASE_TOKEN" in unset.stderr + unset.stdout
    done = cli(
        "submit",
        str(pipeline),
        "--secret",
        "RELEASE_TOKEN",
        "--follow",
        RELEASE_TOKEN=value,
        **remote,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert value not in done.stdout + done.stderr
    run_id = done.stdout.split()[1]
    assert harness.log(run_id, "use") == "token is ***\n"
    assert value not in json.dumps(harness.view(run_id))
    store = open_store(harness.settings.store_url)
    try:
        assert store.get_run_secrets(run_id) == {}
    finally:
        store.close()
