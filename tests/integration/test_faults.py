"""Faults injected into real processes: a worker actor killed mid-step, the master killed."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil
import pytest
import ray

from cicd_ray.names import MASTER_NAME, NAMESPACE, worker_actor_name
from cicd_ray.states import StepState
from tests.waiting import all_gone, pids_in

pytestmark = pytest.mark.fault


@pytest.fixture(autouse=True)
def pools_whole_again(harness):
    """Each test here kills or freezes workers: the lost ones are replaced, and the tests
    after these find whole pools (test_runs and test_monitoring count workers)."""
    yield
    harness.steady()


def test_worker_killed_mid_step_is_retried_elsewhere_and_the_run_succeeds(harness):
    run_id = harness.submit(
        {
            "name": "infra",
            "steps": [
                {
                    "name": "build",
                    "retry": {"max": 1, "on": ["infra"]},
                    "run": (
                        'echo "attempt $CICD_ATTEMPT"; '
                        'if [ "$CICD_ATTEMPT" = 1 ]; then sleep 600; fi'
                    ),
                },
                {"name": "after", "needs": ["build"], "run": "echo after"},
            ],
        }
    )
    step = harness.wait_for_step(run_id, "build", StepState.RUNNING)
    first_worker = step["worker_id"]
    ray.kill(ray.get_actor(worker_actor_name(first_worker), namespace=NAMESPACE))
    view = harness.wait(run_id, timeout_s=60)
    assert view["run"]["state"] == "succeeded"
    build = harness.step(view, "build")
    assert build["attempts"] == 2 and build["worker_id"] != first_worker
    first, second = [a for a in view["attempts"] if a["step"] == "build"]
    assert first["state"] == "failed" and f"worker {first_worker} lost" in first["reason"]
    assert second["state"] == "succeeded"
    assert harness.log(run_id, "build") == "attempt 2\n"
    # The pool is back at full size: the lost worker was replaced.
    assert first_worker not in {w["id"] for w in harness.steady(timeout_s=30)}


def test_worker_killed_with_no_retry_settings_is_retried_automatically(harness, shared_dir):
    """No `retry` at all: a lost worker is the platform's fault; the step runs again
    elsewhere (retry.infra, 2 by default), and the processes of the lost attempt do not run
    on as orphans, not even one that left the process group with setsid."""
    pids = shared_dir / "pids"
    run_id = harness.submit(
        {
            "name": "auto",
            "steps": [
                {
                    "name": "build",
                    "run": (
                        f'if [ "$CICD_ATTEMPT" = 1 ]; then sleep 600 & echo $! >> {pids}; '
                        f"setsid sleep 601 & echo $! >> {pids}; sleep 602; fi; "
                        'echo "attempt $CICD_ATTEMPT"'
                    ),
                }
            ],
        }
    )
    step = harness.wait_for_step(run_id, "build", StepState.RUNNING)
    orphans = pids_in(pids, 2)
    assert all(psutil.pid_exists(p) for p in orphans)
    ray.kill(ray.get_actor(worker_actor_name(step["worker_id"]), namespace=NAMESPACE))
    view = harness.wait(run_id, timeout_s=60)
    build = harness.step(view, "build")
    assert (view["run"]["state"], build["state"], build["attempts"]) == (
        "succeeded",
        "succeeded",
        2,
    )
    first = next(a for a in view["attempts"] if a["step"] == "build" and a["number"] == 1)
    assert f"worker {step['worker_id']} lost" in first["reason"]
    assert harness.log(run_id, "build") == "attempt 2\n"
    assert all_gone(orphans, timeout_s=20)  # a worker's sweep of step users (every 5 s)


def test_worker_killed_without_infra_retry_fails_the_step_with_the_reason(harness):
    run_id = harness.submit(
        {"name": "noretry", "steps": [{"name": "build", "run": "sleep 600", "retry": {"infra": 0}}]}
    )
    step = harness.wait_for_step(run_id, "build", StepState.RUNNING)
    ray.kill(ray.get_actor(worker_actor_name(step["worker_id"]), namespace=NAMESPACE))
    view = harness.wait(run_id, timeout_s=60)
    build = harness.step(view, "build")
    assert (view["run"]["state"], build["state"]) == ("failed", "failed")
    assert f"worker {step['worker_id']} lost" in build["reason"]


def sigkill_master(harness) -> int:
    """SIGKILL the master's process, as the kernel's OOM killer or a crash would; returns the
    time from the kill to a new master answering."""
    pid_before = ray.get(harness.master.ping.remote())["pid"]
    os.kill(pid_before, signal.SIGKILL)
    return new_master(pid_before)


def new_master(pid_before: int) -> float:
    """Seconds until a master other than `pid_before` answers."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        try:
            master = ray.get_actor(MASTER_NAME, namespace=NAMESPACE)
            if ray.get(master.ping.remote(), timeout=5)["pid"] != pid_before:
                return time.monotonic() - t0
        except (ValueError, ray.exceptions.RayError):
            pass
        time.sleep(0.1)
    raise AssertionError("the master did not come back within 60 s")


def test_master_sigkilled_twice_mid_run_restarts_from_the_store_and_the_run_completes(harness):
    run_id = harness.submit(
        {
            "name": "survive",
            "steps": [
                {"name": "first", "run": "echo one"},
                {
                    "name": "slow",
                    "needs": ["first"],
                    "retry": {"max": 2, "on": ["infra"]},
                    "run": "sleep 3; echo two",
                },
                {"name": "later", "needs": ["slow"], "run": "sleep 2; echo three"},
                {"name": "last", "needs": ["later"], "run": "echo four"},
            ],
        }
    )
    harness.wait_for_step(run_id, "slow", StepState.RUNNING)
    assert sigkill_master(harness) < 30
    harness.wait_for_step(run_id, "later", StepState.RUNNING)
    assert sigkill_master(harness) < 30
    view = harness.wait(run_id, timeout_s=60)
    assert view["run"]["state"] == "succeeded"
    assert [s["state"] for s in view["steps"]] == ["succeeded"] * 4
    # The steps that ran through the restarts were followed, not run again.
    assert [s["attempts"] for s in view["steps"]] == [1, 1, 1, 1]
    assert harness.log(run_id, "slow") == "two\n"
    assert harness.log(run_id, "last") == "four\n"


def test_a_submission_acknowledged_just_before_the_master_dies_still_runs(harness):
    run_id = harness.submit(
        {
            "name": "acked",
            "steps": [
                {"name": "a", "run": "echo a"},
                {"name": "b", "needs": ["a"], "run": "echo b"},
            ],
        }
    )
    sigkill_master(harness)  # at once: the run id is all the client has
    view = harness.wait(run_id, timeout_s=60)
    assert view["run"]["state"] == "succeeded"
    assert harness.log(run_id, "b") == "b\n"


def test_a_step_that_ends_while_the_master_is_down_is_not_lost(harness, shared_dir):
    """The master is frozen (SIGSTOP) while the step runs, the step ends (its last command
    writes a file), and only then is the master killed: the step's end certainly fell in the
    time the master could not hear it. Its worker reports it to the new master."""
    ended = shared_dir / "ended"
    run_id = harness.submit(
        {
            "name": "blink",
            "steps": [
                {"name": "quick", "run": f"sleep 1; echo done; touch {ended}"},
                {"name": "after", "needs": ["quick"], "run": "echo after"},
            ],
        }
    )
    harness.wait_for_step(run_id, "quick", StepState.RUNNING)
    pid = ray.get(harness.master.ping.remote())["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while not ended.exists():
            assert time.monotonic() < deadline, "the step never ended"
            time.sleep(0.05)
        time.sleep(0.5)  # its worker has the outcome and cannot deliver it
    finally:
        os.kill(pid, signal.SIGKILL)
    assert new_master(pid) < 30
    view = harness.wait(run_id, timeout_s=60)
    assert view["run"]["state"] == "succeeded"
    assert harness.step(view, "quick")["attempts"] == 1
    assert harness.log(run_id, "quick") == "done\n"
    assert harness.log(run_id, "after") == "after\n"


def test_frozen_worker_misses_heartbeats_and_its_step_is_retried_elsewhere(harness):
    """SIGSTOP freezes the worker's process, as a hung node would: no actor death, only silence."""
    run_id = harness.submit(
        {
            "name": "frozen",
            "steps": [
                {
                    "name": "build",
                    "retry": {"max": 1, "on": ["infra"]},
                    "run": (
                        'if [ "$CICD_ATTEMPT" = 1 ]; then sleep 600; fi; '
                        'echo "done on $CICD_ATTEMPT"'
                    ),
                },
            ],
        }
    )
    step = harness.wait_for_step(run_id, "build", StepState.RUNNING)
    frozen = step["worker_id"]
    pid = ray.get(ray.get_actor(worker_actor_name(frozen), namespace=NAMESPACE).pid.remote())
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        view = harness.wait(run_id, timeout_s=60)
        took = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert view["run"]["state"] == "succeeded"
    first = next(a for a in view["attempts"] if a["number"] == 1)
    assert first["reason"].startswith(f"worker {frozen} lost: no heartbeat for")
    assert took < 30, first["reason"]
    assert harness.log(run_id, "build") == "done on 2\n"


def test_the_api_while_the_master_cannot_answer(harness, api):
    """Frozen (SIGSTOP, the worst case: calls hang rather than fail), then killed: bad input
    still gets its 4xx at once and changes nothing, reads come from the store, and a write
    gets 503 with a retry hint within the API's timeout instead of hanging."""
    import httpx

    from cicd_ray.api.link import MASTER_TIMEOUT_S
    from cicd_ray.client import Client
    from cicd_ray.errors import MasterUnavailable
    from cicd_ray.store import open_store
    from tests.integration.conftest import API_TOKEN

    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    done = harness.run({"name": "before", "steps": [{"name": "hi", "run": "echo hi"}]})
    run_id = done["run"]["id"]
    store = open_store(harness.settings.store_url)
    stored = len(store.list_runs(limit=500))
    assert httpx.get(f"{api}/api/v1/runs/{run_id}", headers=auth).status_code == 200
    pid = ray.get(harness.master.ping.remote())["pid"]
    bad = [
        ({"pipeline": "name: x\nsteps: [{name: a, run: true, tiemout: 3}]"}, 422, "tiemout"),
        ({"pipeline": "steps: ["}, 422, "YAML"),
        (
            {
                "pipeline": {"name": "x", "steps": [{"name": "a", "run": "true"}]},
                "env": {"CICD_RUN_ID": "x"},
            },
            422,
            "CICD_RUN_ID",
        ),
    ]
    os.kill(pid, signal.SIGSTOP)
    try:
        with httpx.Client(base_url=api, headers=auth, timeout=MASTER_TIMEOUT_S + 20) as http:
            for body, status, words in bad:
                t0 = time.monotonic()
                r = http.post("/api/v1/runs", json=body)
                assert (r.status_code, time.monotonic() - t0 < 3) == (status, True), r.text
                assert words in r.json()["detail"]
            assert httpx.get(f"{api}/api/v1/runs", timeout=3).status_code == 401
            r = http.get(f"/api/v1/runs/{run_id}")
            assert r.status_code == 200 and r.json()["run"]["state"] == "succeeded"
            r = http.get(f"/api/v1/runs/{run_id}/steps/hi/log")
            assert (r.status_code, r.text) == (200, "hi\n")
            assert http.get("/api/v1/runs/nope-123").status_code == 404
            t0 = time.monotonic()
            r = http.post(
                "/api/v1/runs",
                json={"pipeline": {"name": "later", "steps": [{"name": "a", "run": "true"}]}},
            )
            waited = time.monotonic() - t0
            assert r.status_code == 503 and r.headers["Retry-After"], r.text
            assert waited < MASTER_TIMEOUT_S + 5
            # The health check says so (a probe's 503), and the client raises its own error.
            health = httpx.get(f"{api}/healthz", timeout=MASTER_TIMEOUT_S + 20)
            assert health.status_code == 503, health.text
            assert (health.json()["status"], health.json()["master"]) == ("degraded", False)
            with (
                Client(api, API_TOKEN, timeout_s=MASTER_TIMEOUT_S + 20) as client,
                pytest.raises(MasterUnavailable, match="not answering"),
            ):
                client.cancel(run_id)
            os.kill(pid, signal.SIGKILL)
            r = http.post("/api/v1/runs", json=bad[0][0])
            assert r.status_code == 422
            assert http.get(f"/api/v1/runs/{run_id}").status_code == 200
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # The frozen master may have stored the submission that timed out: never the bad ones.
    assert len(store.list_runs(limit=500)) - stored <= 1
    assert {r.pipeline for r in store.list_runs(limit=500)[:1]} <= {"before", "later"}
    client_deadline = time.monotonic() + 60
    while time.monotonic() < client_deadline:
        if httpx.get(f"{api}/healthz").status_code == 200:
            break
        time.sleep(0.2)
    assert httpx.get(f"{api}/healthz").json()["master"] is True
