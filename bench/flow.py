"""Flow control's cost, each figure against its baseline measured in the same run, on one
embedded local cluster:

    python bench/flow.py [--runs 20] [--repeats 3]

1. A concurrency group hands its place over: 20 runs of a one-step pipeline in a group of
   limit 1, submitted at once, so they run one after another; against one run whose 20 steps
   form a chain of needs, the scheduler's own way of running steps one after another. Both
   run `true` 20 times in sequence; the ratio is the group's wall time over the chain's.
2. Conditions: a 20-step fan-out whose steps each carry an `if:` that holds, against the same
   pipeline without them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import local_cluster

from cicd_ray.cli.connect import RayRunner, follow_run
from cicd_ray.cluster import session
from cicd_ray.config import Settings
from cicd_ray.pipeline.load import parse_pipeline


class Bench:
    def __init__(self, settings: Settings, master, work: Path) -> None:
        self.settings, self.master, self.work = settings, master, work
        self.runner = RayRunner(master, settings)

    def submit(self, doc: dict, env: dict | None = None) -> str:
        return session.submit(self.master, parse_pipeline(doc), self.work, None, env, self.settings)

    def finish(self, run_ids: list[str]) -> None:
        for run_id in run_ids:
            view = follow_run(self.runner, run_id)
            if view.run.state.value != "succeeded":
                raise SystemExit(f"benchmark run {run_id} ended {view.run.state.value}")


def group_handover(bench: Bench, runs: int, repeats: int) -> None:
    group = {
        "name": "bench-group",
        "concurrency": {"group": "bench-${ROUND}"},
        "steps": [{"name": "deploy", "run": "true"}],
    }
    chain = {
        "name": "bench-chain",
        "steps": [
            {"name": f"s{i}", "run": "true", **({"needs": [f"s{i - 1}"]} if i else {})}
            for i in range(runs)
        ],
    }
    grouped, chained = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        bench.finish([bench.submit(group, {"ROUND": str(r)}) for _ in range(runs)])
        grouped.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bench.finish([bench.submit(chain)])
        chained.append(time.perf_counter() - t0)
    g, c = statistics.median(grouped), statistics.median(chained)
    print(
        f"1. {runs} runs of a group of limit 1, one after another: {g:.2f} s; one run of "
        f"{runs} chained steps: {c:.2f} s; ratio {g / c:.2f} (medians of {repeats}; "
        f"{', '.join(f'{x:.2f}' for x in grouped)} against "
        f"{', '.join(f'{x:.2f}' for x in chained)})"
    )


def conditions(bench: Bench, steps: int, repeats: int) -> None:
    plain = {
        "name": "bench-plain",
        "steps": [{"name": "root", "run": "true"}]
        + [{"name": f"s{i}", "needs": ["root"], "run": "true"} for i in range(steps)],
    }
    guarded = {
        "name": "bench-if",
        "env": {"TARGET": "prod"},
        "steps": [{"name": "root", "run": "true"}]
        + [
            {
                "name": f"s{i}",
                "needs": ["root"],
                "run": "true",
                "if": "success() && (env.TARGET == 'prod' || run.branch == 'main')",
            }
            for i in range(steps)
        ],
    }
    with_if, without = [], []
    for _ in range(repeats):
        for doc, out in ((guarded, with_if), (plain, without)):
            t0 = time.perf_counter()
            bench.finish([bench.submit(doc)])
            out.append(time.perf_counter() - t0)
    a, b = statistics.median(with_if), statistics.median(without)
    print(
        f"2. a {steps}-step fan-out with an `if:` on every step: {a:.2f} s; without: "
        f"{b:.2f} s; ratio {a / b:.2f} (medians of {repeats})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with local_cluster() as (settings, master, work):
        bench = Bench(settings, master, work)
        bench.finish([bench.submit({"name": "warm-up", "steps": [{"name": "a", "run": "true"}]})])
        group_handover(bench, args.runs, args.repeats)
        conditions(bench, args.runs, args.repeats)


if __name__ == "__main__":
    main()
