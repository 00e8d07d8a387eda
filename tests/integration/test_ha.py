"""High availability on a cluster shaped like a deployment (see hacluster.py): the GCS killed
and restarted, the head replaced, a worker node removed, the master killed, on the Redis store."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.integration.hacluster import HaCluster

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def ha(tmp_path_factory, redis_url):
    cluster = HaCluster(tmp_path_factory.mktemp("ha"), redis_url)
    try:
        cluster.start(nodes=2, cpus=2)
        yield cluster
    finally:
        cluster.stop()


def test_the_gcs_killed_and_restarted_mid_run(ha):
    run_id = ha.submit({"name": "gcs", "steps": [
        {"name": "long", "run": "for i in 1 2 3 4 5 6; do echo tick $i; sleep 1; done"},
        {"name": "next", "needs": ["long"], "run": "echo next"},
    ]})
    ha.wait_step(run_id, "long", "running")
    ha.kill_gcs()
    t0 = time.monotonic()
    # While the GCS is down: the running step goes on, and the API answers from the store.
    time.sleep(2)
    during = ha.view(run_id)
    assert during is not None and during["steps"][0]["state"] == "running"
    assert "tick 1" in ha.log(run_id, "long")
    queued = ha.submit({"name": "gcs-later", "steps": [{"name": "a", "run": "echo queued"}]})
    ha.restart_gcs()
    view = ha.wait(run_id)
    assert view["run"]["state"] == "succeeded", view
    assert [s["attempts"] for s in view["steps"]] == [1, 1]
    later = ha.wait(queued)
    assert later["run"]["state"] == "succeeded"
    assert ha.log(queued, "a") == "queued\n"
    print(f"GCS down to run finished: {time.monotonic() - t0:.1f} s")


def test_the_head_replaced_mid_run_with_the_master_on_a_worker_node(ha):
    """The head's processes all SIGKILLed (GCS, raylet, dashboard, Serve's controller and proxy),
    then `cicd-ray up --ha` again, as KubeRay restarts a head pod: the master and the workers
    on the worker nodes carry on, the step running through it is not run again."""
    masters = ha.actor_pids("ray::Master")
    assert len(masters) == 1, "the master must be on a worker node, not the head"
    run_id = ha.submit({"name": "head", "steps": [
        {"name": "long", "run": "for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 1; done"},
        {"name": "next", "needs": ["long"], "run": "echo next"},
    ]})
    ha.wait_step(run_id, "long", "running")
    killed = ha.kill_head()
    t0 = time.monotonic()
    replaced = ha.up()
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert "a new head replaced the one that died" in replaced.stdout
    back = time.monotonic() - t0
    view = ha.wait(run_id)
    assert view["run"]["state"] == "succeeded", view
    assert [s["attempts"] for s in view["steps"]] == [1, 1]
    assert ha.log(run_id, "long").count("tick") == 8
    assert ha.actor_pids("ray::Master") == masters  # the same process all along
    after = ha.submit({"name": "head-after", "steps": [{"name": "a", "run": "echo after"}]})
    assert ha.wait(after)["run"]["state"] == "succeeded"
    print(f"head: {killed} processes killed; API answering again {back:.1f} s later")


def test_a_worker_node_removed_mid_step(ha):
    """Every process of the node running the step is SIGKILLed, as when a machine dies: the
    step is retried on the other node and the run succeeds; a new node joins afterwards."""
    run_id = ha.submit({"name": "node", "steps": [
        {"name": "build", "retry": {"max": 2, "on": ["infra"]},
         "run": 'echo "attempt $CICD_ATTEMPT"; if [ "$CICD_ATTEMPT" = 1 ]; then sleep 987; fi'},
        {"name": "after", "needs": ["build"], "run": "echo after"},
    ]})
    ha.wait_step(run_id, "build", "running")
    sleeper = ha.wait_for_process("sleep 987")
    node = ha.node_of(sleeper)
    had_master = bool(node.actor_pids("ray::Master"))
    assert node.kill() > 0
    ha.nodes.remove(node)
    view = ha.wait(run_id)
    assert view["run"]["state"] == "succeeded", view
    first, second = [a for a in view["attempts"] if a["step"] == "build"]
    assert first["state"] == "failed" and "lost" in first["reason"], first
    assert second["state"] == "succeeded"
    assert ha.log(run_id, "build") == "attempt 2\n"
    ha.add_node(cpus=2)  # back to two nodes for the tests after this one
    print(f"node removed (it had the master: {had_master}); retried: {first['reason']}")


def test_the_master_sigkilled_twice_mid_run_on_the_redis_store(ha):
    run_id = ha.submit({"name": "master-redis", "steps": [
        {"name": "slow", "run": "sleep 3; echo two"},
        {"name": "later", "needs": ["slow"], "run": "sleep 3; echo three"},
        {"name": "last", "needs": ["later"], "run": "echo four"},
    ]})
    for step in ("slow", "later"):
        ha.wait_step(run_id, step, "running")
        [pid] = ha.actor_pids("ray::Master")
        os.kill(pid, signal.SIGKILL)
        ha.wait_for(lambda pid=pid: ha.actor_pids("ray::Master") not in ([], [pid]))
    view = ha.wait(run_id)
    assert view["run"]["state"] == "succeeded", view
    assert [s["attempts"] for s in view["steps"]] == [1, 1, 1]
    assert ha.log(run_id, "last") == "four\n"


def test_a_submission_acknowledged_then_the_master_killed_at_once_on_redis(ha):
    run_id = ha.submit({"name": "acked-redis", "steps": [{"name": "a", "run": "echo a"}]})
    [pid] = ha.actor_pids("ray::Master")
    os.kill(pid, signal.SIGKILL)
    view = ha.wait(run_id)
    assert view["run"]["state"] == "succeeded"
    assert ha.log(run_id, "a") == "a\n"
