"""Faults injected into real processes: a worker actor killed mid-step, the master killed."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import ray

from cicd_ray.states import StepState
from cicd_ray.worker import MASTER_NAME, NAMESPACE, worker_actor_name

pytestmark = pytest.mark.fault


def test_worker_killed_mid_step_is_retried_elsewhere_and_the_run_succeeds(harness):
    run_id = harness.submit({"name": "infra", "steps": [
        {"name": "build", "retry": {"max": 1, "on": ["infra"]},
         "run": 'echo "attempt $CICD_ATTEMPT"; if [ "$CICD_ATTEMPT" = 1 ]; then sleep 600; fi'},
        {"name": "after", "needs": ["build"], "run": "echo after"},
    ]})
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
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = [w for w in harness.master_workers()
                 if w["pool"] == "default" and w["state"] == "ready"]
        if len(ready) == 2:
            break
        time.sleep(0.2)
    assert len(ready) == 2 and first_worker not in {w["id"] for w in ready}


def test_worker_killed_without_infra_retry_fails_the_step_with_the_reason(harness):
    run_id = harness.submit({"name": "noretry", "steps": [
        {"name": "build", "run": "sleep 600"}]})
    step = harness.wait_for_step(run_id, "build", StepState.RUNNING)
    ray.kill(ray.get_actor(worker_actor_name(step["worker_id"]), namespace=NAMESPACE))
    view = harness.wait(run_id, timeout_s=60)
    build = harness.step(view, "build")
    assert (view["run"]["state"], build["state"]) == ("failed", "failed")
    assert f"worker {step['worker_id']} lost" in build["reason"]


def test_master_killed_mid_run_restarts_from_the_store_and_the_run_completes(harness):
    run_id = harness.submit({"name": "survive", "steps": [
        {"name": "first", "run": "echo one"},
        {"name": "slow", "needs": ["first"], "retry": {"max": 2, "on": ["infra"]},
         "run": "sleep 2; echo two"},
        {"name": "last", "needs": ["slow"], "run": "echo three"},
    ]})
    harness.wait_for_step(run_id, "slow", StepState.RUNNING)
    pid_before = ray.get(harness.master.ping.remote())["pid"]
    ray.kill(harness.master, no_restart=False)
    t0 = time.monotonic()
    master = None
    while time.monotonic() - t0 < 60:
        try:
            master = ray.get_actor(MASTER_NAME, namespace=NAMESPACE)
            info = ray.get(master.ping.remote(), timeout=5)
            break
        except (ValueError, ray.exceptions.RayError):
            time.sleep(0.1)
    assert info["pid"] != pid_before
    view = harness.wait(run_id, timeout_s=60)
    assert view["run"]["state"] == "succeeded"
    assert [s["state"] for s in view["steps"]] == ["succeeded"] * 3
    # The step that ran through the restart was followed, not run again.
    assert harness.step(view, "slow")["attempts"] == 1
    assert harness.log(run_id, "slow") == "two\n"
    assert harness.log(run_id, "last") == "three\n"


def test_a_step_that_ends_while_the_master_is_down_is_not_lost(harness):
    run_id = harness.submit({"name": "blink", "steps": [
        {"name": "quick", "run": "sleep 1; echo done"},
        {"name": "after", "needs": ["quick"], "run": "echo after"},
    ]})
    harness.wait_for_step(run_id, "quick", StepState.RUNNING)
    master = ray.get_actor(MASTER_NAME, namespace=NAMESPACE)
    ray.kill(master, no_restart=False)
    time.sleep(1.5)  # the step ends while the master restarts
    view = harness.wait(run_id, timeout_s=60)
    assert view["run"]["state"] == "succeeded"
    assert harness.step(view, "quick")["attempts"] == 1
    assert harness.log(run_id, "after") == "after\n"


def test_frozen_worker_misses_heartbeats_and_its_step_is_retried_elsewhere(harness):
    """SIGSTOP freezes the worker's process, as a hung node would: no actor death, only silence."""
    run_id = harness.submit({"name": "frozen", "steps": [
        {"name": "build", "retry": {"max": 1, "on": ["infra"]},
         "run": 'if [ "$CICD_ATTEMPT" = 1 ]; then sleep 600; fi; echo "done on $CICD_ATTEMPT"'},
    ]})
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
