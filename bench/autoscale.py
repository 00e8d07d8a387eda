"""Look-ahead against none: how long stage two of a pipeline waits for capacity.

    python bench/autoscale.py [--rounds 2]

On the local autoscaling cluster (`cicd-ray up --local-autoscaling`, Ray's fake multi-node
provider: a node per worker, added and removed by the Ray autoscaler), a pipeline of one
10-second build step and four 5-second 2-CPU test steps that need it. Pool `default`: 2-CPU workers,
one kept warm (the build runs at once), at most five. With look-ahead, the master asks the
autoscaler for the tests' capacity while the build runs; without it, the nodes are asked for
only when the tests are ready. Measured from the attempts' records: the tests' wait for
capacity (the part of their wait before the worker that ran them was up), their whole wait
(capacity and a busy worker), and stage two's span (the build's end to the last test's end).
Baseline (look-ahead off) in the same run, then the ratios.
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
PIPELINE = {
    "name": "two-stage",
    "steps": [
        {"name": "build", "run": "sleep 10", "resources": {"cpu": 2}},
        *(
            {"name": f"test{i}", "needs": ["build"], "run": "sleep 5", "resources": {"cpu": 2}}
            for i in range(4)
        ),
    ],
}


def wait_until(check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s} s")
        time.sleep(0.5)


def one_round(cluster: LocalAutoscaling) -> dict[str, float]:
    """Stage two's figures, from a cluster back at its one warm worker."""
    wait_until(
        lambda: (
            [w["state"] for w in cluster.live_workers()] == ["ready"] and cluster.raylets() == 2
        ),
        180,
    )
    r = cluster.http.post("/api/v1/runs", json={"pipeline": PIPELINE})
    r.raise_for_status()
    run_id = r.json()["run_id"]
    view: dict = {}

    def ended() -> bool:
        view.update(cluster.http.get(f"/api/v1/runs/{run_id}").json())
        return view["run"]["state"] in ("succeeded", "failed", "cancelled")

    wait_until(ended, 240)
    assert view["run"]["state"] == "succeeded", view["run"]
    tests = [a for a in view["attempts"] if a["step"].startswith("test")]
    build = next(a for a in view["attempts"] if a["step"] == "build")
    return {
        "capacity": statistics.mean(a["wait_capacity_s"] for a in tests),
        "wait": statistics.mean(a["wait_capacity_s"] + a["wait_slot_s"] for a in tests),
        "span": max(a["finished_at"] for a in tests) - build["finished_at"],
    }


def measure(lookahead: bool, rounds: int) -> list[dict[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="cicd-bench-autoscale-"))
    cluster = LocalAutoscaling(tmp, POOLS, CICD_RAY_LOOKAHEAD="1" if lookahead else "0")
    cluster.up(node_idle_timeout_s=5)
    try:
        return [one_round(cluster) for _ in range(rounds)]
    finally:
        cluster.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    off = measure(False, args.rounds)
    on = measure(True, args.rounds)
    print(
        f"stage two of a two-stage pipeline, medians of {args.rounds} round(s) "
        "(4 tests x 2 CPUs x 5 s after a 10 s build; a node per worker)"
    )
    print(f"{'':32}{'off':>8}{'on':>8}{'on/off':>8}")
    for key, label in (
        ("capacity", "mean wait for capacity (s)"),
        ("wait", "mean wait, capacity + slot (s)"),
        ("span", "span, build end to last test (s)"),
    ):
        a = statistics.median(r[key] for r in off)
        b = statistics.median(r[key] for r in on)
        print(f"{label:32}{a:8.2f}{b:8.2f}{b / a if a else float('nan'):8.2f}")
    print(f"rounds off: {off}\nrounds on:  {on}")


if __name__ == "__main__":
    main()
