"""Look-ahead against none: how long stage two of a pipeline waits for capacity.

    python bench/autoscale.py [--rounds 2]

On the local autoscaling cluster (`cicd-ray up --local-autoscaling`, Ray's fake multi-node
provider: a node per worker, added and removed by the Ray autoscaler), a pipeline of one
10-second build step and four 2-CPU test steps that need it. Pool `default`: 2-CPU workers,
one kept warm (the build runs at once), at most five. With look-ahead, the master asks the
autoscaler for the tests' capacity while the build runs; without it, the nodes are asked for
only when the tests are ready. Measured: the tests' wait for capacity (the part of their wait
before the worker that ran them was up), from the attempts' records. Baseline (look-ahead
off) in the same run, then the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.clusters import LocalAutoscaling

POOLS = """\
pools:
  - {name: default, cpus: 2, memory_mb: 512, min_workers: 1, max_workers: 5,
     scale_up_step: 4, cooldown_s: 1, window_s: 5, idle_timeout_s: 3}
"""
PIPELINE = {"name": "two-stage", "steps": [
    {"name": "build", "run": "sleep 10", "resources": {"cpu": 2}},
    *({"name": f"test{i}", "needs": ["build"], "run": "sleep 1", "resources": {"cpu": 2}}
      for i in range(4)),
]}


def wait_until(check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s} s")
        time.sleep(0.5)


def one_round(cluster: LocalAutoscaling) -> list[float]:
    """Stage two's waits for capacity, from a cluster back at its one warm worker."""
    wait_until(lambda: [w["state"] for w in cluster.live_workers()] == ["ready"]
               and cluster.raylets() == 2, 180)
    r = cluster.http.post("/api/v1/runs", json={"pipeline": PIPELINE})
    r.raise_for_status()
    run_id = r.json()["run_id"]
    view: dict = {}

    def ended() -> bool:
        view.update(cluster.http.get(f"/api/v1/runs/{run_id}").json())
        return view["run"]["state"] in ("succeeded", "failed", "cancelled")

    wait_until(ended, 240)
    assert view["run"]["state"] == "succeeded", view["run"]
    return [a["wait_capacity_s"] for a in view["attempts"] if a["step"].startswith("test")]


def measure(lookahead: bool, rounds: int) -> list[float]:
    tmp = Path(tempfile.mkdtemp(prefix="cicd-bench-autoscale-"))
    cluster = LocalAutoscaling(tmp, POOLS, CICD_RAY_LOOKAHEAD="1" if lookahead else "0")
    cluster.up(node_idle_timeout_s=5)
    try:
        return [statistics.mean(one_round(cluster)) for _ in range(rounds)]
    finally:
        cluster.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    off = measure(False, args.rounds)
    on = measure(True, args.rounds)
    print(f"stage two's mean wait for capacity, {args.rounds} round(s) each "
          "(4 tests x 2 CPUs after a 10 s build; a node per worker)")
    print(f"  look-ahead off: {statistics.median(off):5.2f} s   (rounds: "
          f"{', '.join(f'{x:.2f}' for x in off)})")
    print(f"  look-ahead on:  {statistics.median(on):5.2f} s   (rounds: "
          f"{', '.join(f'{x:.2f}' for x in on)})")
    print(f"  ratio on/off:   {statistics.median(on) / statistics.median(off):5.2f}")


if __name__ == "__main__":
    main()
