"""Real pipelines on a real local Ray cluster: what a user sees at the end of a run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
import yaml

from cicd_ray.errors import SpecError
from cicd_ray.protocol import Rejected, SubmitCommand
from cicd_ray.states import StepState
from tests.waiting import all_gone, pids_in, wait_until


def test_hello_pipeline_runs_in_dag_order_with_matrix(harness):
    doc = yaml.safe_load(Path("pipelines/hello.yaml").read_text())
    view = harness.run(doc)
    assert view["run"]["state"] == "succeeded"
    steps = {s["spec"]["name"]: s for s in view["steps"]}
    tests = [steps[f"test[py={v}]"] for v in ("3.10", "3.11", "3.12")]
    assert all(s["state"] == "succeeded" for s in steps.values())
    assert all(t["started_at"] >= steps["build"]["finished_at"] for t in tests)
    last_need = max(s["finished_at"] for s in [*tests, steps["lint"]])
    assert steps["package"]["started_at"] >= last_need
    assert "testing on python 3.11" in harness.log(view["run"]["id"], "test[py=3.11]")
    assert harness.log(view["run"]["id"], "build").startswith(
        f"hello from build (run {view['run']['id']}, attempt 1)"
    )


def test_failure_skips_dependents_and_fails_the_run(harness):
    view = harness.run(
        {
            "name": "fails",
            "steps": [
                {"name": "compile", "run": "echo compiling; exit 7"},
                {"name": "test", "run": "echo never", "needs": ["compile"]},
                {"name": "deploy", "run": "echo never", "needs": ["test"]},
                {"name": "docs", "run": "echo docs ok"},
            ],
        }
    )
    assert view["run"]["state"] == "failed"
    assert view["run"]["reason"] == "failed steps: compile"
    got = {s["spec"]["name"]: (s["state"], s["exit_code"], s["reason"]) for s in view["steps"]}
    assert got == {
        "compile": ("failed", 7, "exit code 7"),
        "test": ("skipped", None, "needs compile (failed)"),
        "deploy": ("skipped", None, "needs test (skipped)"),
        "docs": ("succeeded", 0, ""),
    }
    assert harness.log(view["run"]["id"], "compile") == "compiling\n"


def test_retry_on_failure_keeps_each_attempts_log(harness):
    view = harness.run(
        {
            "name": "flaky",
            "steps": [
                {
                    "name": "flaky",
                    "retry": {"max": 3, "on": ["failure"]},
                    "run": 'echo "try $CICD_ATTEMPT"; [ "$CICD_ATTEMPT" -ge 3 ]',
                }
            ],
        }
    )
    step = harness.step(view, "flaky")
    assert view["run"]["state"] == "succeeded" and step["attempts"] == 3
    run_id = view["run"]["id"]
    assert [harness.log(run_id, "flaky", n) for n in (1, 2, 3)] == ["try 1\n", "try 2\n", "try 3\n"]
    assert [a["state"] for a in view["attempts"]] == ["failed", "failed", "succeeded"]


def test_timeout_kills_step_and_its_background_children(harness, shared_dir):
    pids = shared_dir / "pids"
    run_id = harness.submit(
        {
            "name": "slow",
            "steps": [
                {
                    "name": "hang",
                    "timeout": 2,
                    "run": f"sleep 600 & echo $! >> {pids}\n(sleep 601 & echo $! >> {pids}; "
                    "wait) &\n"
                    "echo waiting; sleep 602",
                }
            ],
        }
    )
    running = pids_in(pids, 2)  # as the test sees them, while they run
    assert len(running) >= 2
    view = harness.wait(run_id)
    step = harness.step(view, "hang")
    assert (view["run"]["state"], step["state"]) == ("failed", "timed_out")
    assert step["reason"] == "timed out after 2 s"
    assert all_gone(running)


def test_growing_log_is_readable_while_the_step_runs(harness):
    run_id = harness.submit(
        {
            "name": "chatty",
            "steps": [
                {"name": "talk", "run": "for i in $(seq 1 15); do echo line $i; sleep 0.2; done"}
            ],
        }
    )
    step = harness.wait_for_step(run_id, "talk", StepState.RUNNING)
    sizes = []
    while step["state"] == "running":
        sizes.append(len(ray.get(harness.master.read_log.remote(step["current_attempt"]))))
        time.sleep(0.3)
        step = harness.step(harness.view(run_id), "talk")
    growing = sorted(set(s for s in sizes if s > 0))
    assert len(growing) >= 3, sizes  # seen at several lengths before the step ended
    assert harness.log(run_id, "talk").splitlines()[-1] == "line 15"


def test_cancel_kills_running_steps_and_cancels_queued(harness, shared_dir):
    marker = shared_dir / "pid"
    run_id = harness.submit(
        {
            "name": "cancelme",
            "steps": [
                {"name": "long", "run": f"echo $$ > {marker}; sleep 600"},
                {"name": "after", "run": "true", "needs": ["long"]},
            ],
        }
    )
    harness.wait_for_step(run_id, "long", StepState.RUNNING)
    [pid] = pids_in(marker)
    assert ray.get(harness.master.cancel.remote(run_id)) == "running"
    view = harness.wait(run_id, timeout_s=30)
    assert view["run"]["state"] == "cancelled"
    assert [s["state"] for s in view["steps"]] == ["cancelled", "cancelled"]
    assert ray.get(harness.master.cancel.remote(run_id)) == "cancelled"  # idempotent
    assert ray.get(harness.master.cancel.remote("no-such-run")) is None
    assert all_gone([pid])


def test_source_snapshot_is_in_every_workspace_and_env_overrides_apply(harness, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "VERSION").write_text("1.2.3\n")
    view = harness.run(
        {
            "name": "src",
            "env": {"WHO": "pipeline"},
            "steps": [
                {"name": f"read{i}", "run": "cat VERSION; echo $WHO; rm VERSION"} for i in range(3)
            ],
        },
        source=src,
        env={"WHO": "override"},
    )
    assert view["run"]["state"] == "succeeded"
    for i in range(3):
        assert harness.log(view["run"]["id"], f"read{i}") == "1.2.3\noverride\n"


def test_steps_run_in_their_pool(harness):
    view = harness.run(
        {
            "name": "pools",
            "steps": [
                {
                    "name": "a",
                    "run": "true",
                    "pool": "solo",
                    "resources": {"cpu": 1, "memory_mb": 100},
                },
                {"name": "b", "run": "true"},
            ],
        }
    )
    assert harness.step(view, "a")["worker_id"].startswith("solo-")
    assert harness.step(view, "b")["worker_id"].startswith("default-")


def test_bad_submissions_are_rejected_and_change_nothing(harness):
    before = ray.get(harness.master.stats.remote())["active_runs"]
    with pytest.raises(SpecError) as info:
        harness.submit(
            {
                "name": "gpu",
                "steps": [
                    {"name": "train", "run": "true", "pool": "gpu"},
                    {"name": "huge", "run": "true", "resources": {"cpu": 64}},
                ],
            }
        )
    assert info.value.problems == [
        "steps (train).pool: unknown pool 'gpu'; configured pools are: default, solo",
        "steps (huge).resources.cpu: 64 is more than a worker of pool 'default' has (2); "
        "ask for at most 2",
    ]
    answer = ray.get(
        harness.master.submit.remote(SubmitCommand(pipeline={"name": "x", "steps": []}))
    )
    assert answer == Rejected(problems=["steps: must list at least one step"])
    answer = ray.get(
        harness.master.submit.remote(
            SubmitCommand(
                pipeline={"name": "x", "steps": [{"name": "a", "run": "true"}]},
                env={"CICD_RUN_ID": "x"},
            )
        )
    )
    assert answer == Rejected(problems=["env.CICD_RUN_ID: names starting with CICD_ are reserved"])
    assert ray.get(harness.master.stats.remote())["active_runs"] == before


def test_workers_register_and_report_resource_use(harness):
    def reported() -> list[dict]:
        ready = harness.steady()
        return ready if all(w["memory_used_mb"] for w in ready) else []

    workers = wait_until(reported, what="every worker's first report")
    pools = sorted(w["pool"] for w in workers)
    assert pools == ["default", "default", "solo"]
    for w in workers:
        assert w["node"] and w["memory_used_mb"] > 10 and 0 <= w["disk_used_percent"] <= 100
