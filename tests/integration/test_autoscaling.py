"""Real scaling on a local autoscaling cluster (`cicd-ray up --local-autoscaling`): the master
starts workers from the queue, the Ray autoscaler adds a node for each worker it cannot place,
and when the queue is gone both go away again."""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import psutil
import pytest

from tests.integration.hacluster import BIN, ROOT, free_port

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


class LocalAutoscaling:
    def __init__(self, tmp) -> None:
        self.pools = tmp / "pools.yaml"
        self.pools.write_text(POOLS)
        self.port, self.ray_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = "scale-token-" + "z" * 20
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("RAY_", "CICD_RAY_"))}
        self.env.update(PATH=f"{BIN}:{self.env['PATH']}", RAY_USAGE_STATS_ENABLED="0",
                        CICD_RAY_HOME=str(tmp / "home"), CICD_RAY_TOKENS=self.token,
                        CICD_RAY_HEARTBEAT_INTERVAL_S="0.5")
        self.http = httpx.Client(base_url=self.url, timeout=30,
                                 headers={"Authorization": f"Bearer {self.token}"})

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "cicd-ray"), *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=300)

    def raylets(self) -> int:
        """Raylets of this cluster: the head's and one per node the autoscaler added."""
        mark = f":{self.ray_port}"
        return sum(1 for p in psutil.process_iter(["cmdline"])
                   if "raylet" in (p.info["cmdline"] or [""])[0]
                   and any(mark in part for part in p.info["cmdline"]))

    def live_workers(self) -> list[dict]:
        workers = self.http.get("/api/v1/workers").json()["workers"]
        return [w for w in workers if w["state"] in ("starting", "ready")]


@pytest.fixture(scope="module")
def scaling(tmp_path_factory):
    cluster = LocalAutoscaling(tmp_path_factory.mktemp("autoscaling"))
    started = cluster.cli("up", "--local-autoscaling", str(cluster.pools),
                          "--node-idle-timeout", "5", "--port", str(cluster.port),
                          "--ray-port", str(cluster.ray_port), "--proxy-location", "HeadOnly")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield cluster
    finally:
        cluster.http.close()
        stopped = cluster.cli("down")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def test_six_parallel_steps_bring_up_nodes_and_idle_ones_go_away(scaling):
    assert scaling.raylets() == 1, "only the head before any run"
    assert scaling.live_workers() == []
    steps = [{"name": f"s{i}", "run": "sleep 5; echo done", "resources": {"cpu": 1}}
             for i in range(6)]
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
        scaling.live_workers(), scaling.raylets())
    print(f"nodes at most {most_nodes}, workers at most {most_workers}, "
          f"capacity waits {sorted(waits)}")
