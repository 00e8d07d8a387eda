"""High availability on a cluster shaped like a deployment (see clusters.py): the GCS killed
and restarted, the head replaced, a worker node removed, the master killed, on the Redis store."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.integration.clusters import HaCluster, S3Server

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ha(tmp_path_factory, redis_url, s3):
    # Artifacts and caches in an S3-compatible store, as on a real cluster.
    cluster = HaCluster(
        tmp_path_factory.mktemp("ha"), redis_url, CICD_RAY_ARTIFACTS=s3.url, **s3.env
    )
    try:
        cluster.start(nodes=2, cpus=2)
        yield cluster
    finally:
        cluster.stop()


def test_an_artifact_made_on_one_node_is_used_on_another_through_s3(ha, s3):
    run_id = ha.submit(
        {
            "name": "handover",
            "steps": [
                {
                    "name": "make",
                    "run": "mkdir -p dist; head -c 300000 /dev/urandom > dist/blob; "
                    "sha256sum dist/blob | cut -c1-64",
                    "artifacts": ["dist"],
                },
                {
                    "name": "use",
                    "needs": ["make"],
                    "matrix": {"n": ["1", "2", "3"]},
                    "run": "sha256sum dist/blob | cut -c1-64; sleep 1.5",
                },
            ],
        }
    )
    view = ha.wait(run_id)
    assert view["run"]["state"] == "succeeded", view
    made = re.findall(r"^[0-9a-f]{64}$", ha.log(run_id, "make"), re.M)[0]
    [kept] = next(s for s in view["steps"] if s["spec"]["name"] == "make")["artifacts"]
    assert kept["digest"] == made and kept["size"] == 300000
    assert f"blobs/{made[:2]}/{made}" in {k.removeprefix("ci/") for k in s3.object_keys()}
    nodes = {w["id"]: w["node"] for w in ha.http.get("/api/v1/workers").json()["workers"]}
    worker_of = {s["spec"]["name"]: s["worker_id"] for s in view["steps"]}
    users = [name for name in worker_of if name.startswith("use[")]
    for name in users:
        assert re.findall(r"^[0-9a-f]{64}$", ha.log(run_id, name), re.M) == [made]
    # Three steps at once fill the three workers: one of them is on the other node.
    assert any(nodes[worker_of[n]] != nodes[worker_of["make"]] for n in users), worker_of
    # The API replica on the head reads the same bucket for a download.
    got = ha.http.get(f"/api/v1/runs/{run_id}/artifacts/make/dist/blob")
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == made


def test_the_gcs_keeps_its_tables_in_redis_under_the_ha_namespace(ha):
    """`up --ha-namespace`: one Redis can hold the GCS tables of several clusters apart."""
    import redis

    client = redis.Redis.from_url(ha.gcs_redis + "/0")
    keys = [k.decode() for k in client.scan_iter(count=1000)]
    client.close()
    assert any(ha.namespace in k for k in keys), keys[:20]  # the default would be cicd-ray


def test_the_gcs_killed_and_restarted_mid_run(ha):
    run_id = ha.submit(
        {
            "name": "gcs",
            "steps": [
                {"name": "long", "run": "for i in 1 2 3 4 5 6; do echo tick $i; sleep 1; done"},
                {"name": "next", "needs": ["long"], "run": "echo next"},
            ],
        }
    )
    ha.wait_step(run_id, "long", "running")
    ha.kill_gcs()
    t0 = time.monotonic()
    # While the GCS is down: the running step goes on (its log grows), and the API answers
    # from the store.
    ha.wait_for(lambda: "tick 3" in ha.log(run_id, "long"), timeout_s=20)
    assert ha.gcs_process() is None, "the GCS came back by itself"
    during = ha.view(run_id)
    assert during is not None and during["steps"][0]["state"] == "running"
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
    run_id = ha.submit(
        {
            "name": "head",
            "steps": [
                {"name": "long", "run": "for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 1; done"},
                {"name": "next", "needs": ["long"], "run": "echo next"},
            ],
        }
    )
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


def test_a_worker_node_removed_mid_step_with_the_master_on_it(ha, shared_dir):
    """Every process of the node that runs the master is SIGKILLed, as when a machine dies,
    while three steps run (one on each worker: both nodes run at least one). The master
    comes back on the other node, the steps of the dead node are retried there, the others
    finish where they ran; the run succeeds. A new node joins afterwards."""
    go = shared_dir / "go"  # first attempts wait for it: they are all running at the kill
    names = ["b0", "b1", "b2"]
    run_id = ha.submit(
        {
            "name": "node",
            "steps": [
                *(
                    {
                        "name": n,
                        "retry": {"max": 2, "on": ["infra"]},
                        "run": f'echo "attempt $CICD_ATTEMPT"; if [ "$CICD_ATTEMPT" = 1 ]; then '
                        f"until [ -e {go} ]; do sleep 0.1; done; fi",
                    }
                    for n in names
                ),
                {"name": "after", "needs": names, "run": "echo after"},
            ],
        }
    )
    for name in names:
        ha.wait_step(run_id, name, "running")
    [master] = ha.actor_pids("ray::Master")
    node = ha.node_of(master)
    assert node.kill() > 0
    ha.nodes.remove(node)
    ha.wait_for(lambda: [p for p in ha.actor_pids("ray::Master") if p != master], 90)
    go.touch()
    view = ha.wait(run_id)
    assert view["run"]["state"] == "succeeded", view
    lost = [a for a in view["attempts"] if a["state"] == "failed"]
    assert lost, "no step ran on the master's node"
    for attempt in lost:
        assert attempt["number"] == 1 and "lost" in attempt["reason"], attempt
        assert ha.log(run_id, attempt["step"]) == "attempt 2\n"
    kept = set(names) - {a["step"] for a in lost}
    for name in kept:  # ran on the other node through it all
        assert ha.log(run_id, name) == "attempt 1\n"
    assert ha.log(run_id, "after") == "after\n"
    ha.add_node(cpus=2)  # back to two nodes for the tests after this one
    print(f"node with the master removed; {len(lost)} step(s) retried: {lost[0]['reason']}")


def test_the_master_sigkilled_twice_mid_run_on_the_redis_store(ha):
    run_id = ha.submit(
        {
            "name": "master-redis",
            "steps": [
                {"name": "slow", "run": "sleep 3; echo two"},
                {"name": "later", "needs": ["slow"], "run": "sleep 3; echo three"},
                {"name": "last", "needs": ["later"], "run": "echo four"},
            ],
        }
    )
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


CHAOS_RUNS = 6
CHAOS_LAYERS, CHAOS_WIDTH = 5, 4  # 20 steps a run
CHAOS_MAX_S = 150


def chaos_pipeline(index: int, ledger: Path, failing: bool) -> dict:
    """Layers of steps, each needing the layer before; every step appends its run, step and
    attempt to the ledger first. In the failing pipeline one step exits 3 on every attempt."""
    steps = []
    for layer in range(CHAOS_LAYERS):
        for col in range(CHAOS_WIDTH):
            name = f"s{layer}-{col}"
            run = (
                f'echo "$CICD_RUN_ID $CICD_STEP $CICD_ATTEMPT" >> {ledger}; '
                f"sleep {0.5 + (layer * 7 + col * 3 + index) % 9 / 8:.2f}"
            )
            if failing and name == "s2-1":
                run += "; exit 3"
            steps.append(
                {
                    "name": name,
                    "run": run,
                    "retry": {"max": 8, "on": ["infra"]},
                    "needs": [f"s{layer - 1}-{c}" for c in range(CHAOS_WIDTH) if layer],
                }
            )
    return {"name": f"chaos-{index}", "steps": steps}


class Chaos(threading.Thread):
    """Kills the master, a worker or the GCS (restarted 1-3 s later) every 1.5-4 s."""

    def __init__(self, ha: HaCluster, seed: int) -> None:
        super().__init__(daemon=True)
        self.ha = ha
        self.random = random.Random(seed)
        self.stop = threading.Event()
        self.injected: dict[str, int] = {"master": 0, "worker": 0, "gcs": 0}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(self.random.uniform(1.5, 4)):
                kind = self.random.choice(["master", "worker", "worker", "gcs"])
                if kind == "gcs":
                    self.ha.kill_gcs()
                    try:
                        time.sleep(self.random.uniform(1, 3))
                    finally:
                        self.ha.restart_gcs()
                else:
                    pids = self.ha.actor_pids("ray::Master" if kind == "master" else "ray::Worker")
                    if not pids:
                        continue  # restarting: nothing of that kind to kill right now
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.random.choice(pids), signal.SIGKILL)
                self.injected[kind] += 1
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.mark.chaos
def test_chaos(ha, shared_dir):
    ledger = shared_dir / "ledger.txt"
    ledger.touch()
    ledger.chmod(0o666)  # steps append to it as users of their own
    chaos = Chaos(ha, seed=int(os.environ.get("CHAOS_SEED", "7")))
    chaos.start()
    t0 = time.monotonic()
    try:
        runs = {}
        for i in range(CHAOS_RUNS):
            failing = i == CHAOS_RUNS - 1
            runs[ha.submit(chaos_pipeline(i, ledger, failing), retries_s=120)] = failing
            time.sleep(1)
        views = {}
        deadline = t0 + CHAOS_MAX_S
        while len(views) < len(runs) and time.monotonic() < deadline:
            for run_id in runs:
                view = ha.view(run_id)
                if view and view["run"]["state"] in ("succeeded", "failed", "cancelled"):
                    views[run_id] = view
            time.sleep(0.5)
    finally:
        chaos.stop.set()
        chaos.join(timeout=30)
    assert chaos.error is None, repr(chaos.error)
    for run_id in set(runs) - set(views):  # the faults have stopped: let them finish
        views[run_id] = ha.wait(run_id, timeout_s=120)
    took = time.monotonic() - t0

    lines = [tuple(line.split()) for line in ledger.read_text().splitlines()]
    executed: dict[tuple[str, str], list[int]] = {}
    for run_id, step, attempt in lines:
        executed.setdefault((run_id, step), []).append(int(attempt))
    steps = retries = lost = 0
    for run_id, failing in runs.items():
        view = views[run_id]
        assert view["run"]["state"] == ("failed" if failing else "succeeded"), (
            view["run"],
            [
                (a["step"], a["number"], a["state"], a["reason"])
                for a in view["attempts"]
                if a["state"] != "succeeded"
            ],
        )
        for step in view["steps"]:
            name = step["spec"]["name"]
            steps += 1
            attempts = [a for a in view["attempts"] if a["step"] == name]
            numbers = [a["number"] for a in attempts]
            ran = executed.get((run_id, name), [])
            # An attempt ran at most once, and only attempts the store recorded ran.
            assert len(ran) == len(set(ran)) and set(ran) <= set(numbers), (name, ran, numbers)
            assert (
                numbers == list(range(1, len(numbers) + 1)) == list(range(1, step["attempts"] + 1))
            ), (name, numbers, step["attempts"])
            # No result applied twice: one succeeded attempt, the last, for a succeeded step.
            won = [a["number"] for a in attempts if a["state"] == "succeeded"]
            if step["state"] == "succeeded":
                assert won == [numbers[-1]] and numbers[-1] in ran, (name, attempts)
            else:
                assert not won
            retries += max(0, len(numbers) - 1)
            # In the failing run: layers 0-2 succeed but s2-1, layers 3-4 are skipped.
            expected = (
                "failed"
                if failing and name == "s2-1"
                else "skipped"
                if failing and name[1] in "34"
                else "succeeded"
            )
            if step["state"] != expected:
                lost += 1
    faults = sum(chaos.injected.values())
    table = (
        f"\n| faults injected | master | worker | gcs | runs | steps | retries | lost |"
        f" seconds |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| {faults} | {chaos.injected['master']} | {chaos.injected['worker']} | "
        f"{chaos.injected['gcs']} | {len(runs)} | {steps} | {retries} | {lost} | "
        f"{took:.0f} |"
    )
    print(table)
    assert lost == 0 and faults >= 5, table
