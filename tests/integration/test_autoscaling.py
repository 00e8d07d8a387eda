"""Real scaling on a local autoscaling cluster (`cicd-ray up --local-autoscaling`): the master
starts workers from the queue, the Ray autoscaler adds a node for each worker it cannot place,
and when the queue is gone both go away again."""

from __future__ import annotations

import time

import pytest

from tests.integration.clusters import LocalAutoscaling

POOLS = """\
pools:
  - name: default
    cpus: 2
    memory_mb: 512
    min_workers: 0
    max_workers: 3
    cooldown_s: 1
    window_s: 5
    idle_timeout_s: 3
"""


@pytest.fixture(scope="module")
def scaling(tmp_path_factory):
    cluster = LocalAutoscaling(tmp_path_factory.mktemp("autoscaling"), POOLS)
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()


def test_six_parallel_steps_bring_up_nodes_and_idle_ones_go_away(scaling):
    assert scaling.raylets() == 1, "only the head before any run"
    assert scaling.live_workers() == []
    steps = [
        {"name": f"s{i}", "run": "sleep 5; echo done", "resources": {"cpu": 1}} for i in range(6)
    ]
    r = scaling.http.post("/api/v1/runs", json={"pipeline": {"name": "wide", "steps": steps}})
    assert r.status_code == 201, r.text
    run_id = r.json()["run_id"]
    most_nodes = most_workers = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        most_nodes = max(most_nodes, scaling.raylets() - 1)
        most_workers = max(most_workers, len(scaling.live_workers()))
        view = scaling.http.get(f"/api/v1/runs/{run_id}").json()
        if view["run"]["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert view["run"]["state"] == "succeeded", view
    assert most_nodes >= 2 and most_workers >= 2, (most_nodes, most_workers)
    # Where the time went: the first steps waited for a node to come up.
    waits = [a["wait_capacity_s"] for a in view["attempts"]]
    assert max(waits) > 1.0, waits
    # Back to nothing: workers retired after their idle timeout, then their nodes removed.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not scaling.live_workers() and scaling.raylets() == 1:
            break
        time.sleep(1)
    assert scaling.live_workers() == [] and scaling.raylets() == 1, (
        scaling.live_workers(),
        scaling.raylets(),
    )
    print(
        f"nodes at most {most_nodes}, workers at most {most_workers}, "
        f"capacity waits {sorted(waits)}"
    )
