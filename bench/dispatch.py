"""Dispatch overhead of cicd-ray against plain Ray tasks, on one local cluster, in one process.

    python bench/dispatch.py [--steps 500] [--chain 50] [--queued 5000] [--slots 4] [--repeats 3]
                             [--step-uids 200000-201023 | --step-uids off]

1. Fan-out: N independent `true` steps through cicd-ray, and N plain Ray tasks that each run
   `bash -c true`, with the same number of slots (CPUs) on both sides. Prints the wall-time ratio.
2. Chain: a 50-step chain (each step needs the previous one) against 50 plain tasks run one
   after another. Prints the per-step overhead of each.
3. Memory: the master's resident memory before and after 5,000 steps (a run's most) are
   queued (in a pool with no workers, so they stay queued).

Both sides are warmed up first (worker processes started) so neither pays for start-up.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import ray

from cicd_ray.cli.connect import RayRunner, follow_run
from cicd_ray.cluster import session
from cicd_ray.config import DEFAULT_STEP_UIDS, Settings, parse_uids
from cicd_ray.pipeline.load import parse_pipeline
from cicd_ray.pipeline.model import MAX_PLANNED_STEPS
from cicd_ray.pools import PoolConfig
from cicd_ray.worker.isolation import describe


@ray.remote(num_cpus=1)
def plain_step() -> int:
    return subprocess.run(["bash", "-c", "true"], check=False).returncode


def run_pipeline(master, settings: Settings, doc: dict) -> float:
    t0 = time.perf_counter()
    run_id = session.submit(master, parse_pipeline(doc), Path("."), None, None, settings)
    view = follow_run(RayRunner(master, settings), run_id)
    took = time.perf_counter() - t0
    state = view.run.state.value
    if state != "succeeded":
        raise SystemExit(f"benchmark run {run_id} ended {state}")
    return took


def fan_out(n: int) -> dict:
    return {
        "name": "bench-fan-out",
        "steps": [
            {"name": f"s{i}", "run": "true", "resources": {"cpu": 1, "memory_mb": 0}}
            for i in range(n)
        ],
    }


def chain(n: int) -> dict:
    steps = [{"name": "s0", "run": "true"}]
    steps += [{"name": f"s{i}", "run": "true", "needs": [f"s{i - 1}"]} for i in range(1, n)]
    return {
        "name": "bench-chain",
        "defaults": {"resources": {"cpu": 1, "memory_mb": 0}},
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--chain", type=int, default=50)
    parser.add_argument("--queued", type=int, default=MAX_PLANNED_STEPS)
    parser.add_argument("--slots", type=int, default=4, help="CPUs for each side")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side")
    parser.add_argument(
        "--step-uids",
        default=DEFAULT_STEP_UIDS,
        help="users of their own for steps when run as root, or off",
    )
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="cicd-bench-"))
    settings = Settings(
        home=home,
        step_uids=args.step_uids,
        pools={
            "default": PoolConfig(name="default", workers=args.slots, cpus=1, memory_mb=0),
            "parked": PoolConfig(name="parked", workers=0, cpus=1, memory_mb=0),
        },
    )
    # Workers hold their slots as CPUs; plain tasks get as many CPUs of their own.
    session.connect(settings=settings, num_cpus=2 * args.slots)
    master = session.ensure_master(settings)
    for d in (fan_out(args.slots * 4), chain(3)):  # warm up: workers registered, code loaded
        run_pipeline(master, settings, d)
    ray.get([plain_step.remote() for _ in range(args.slots * 4)])

    # Each side runs --repeats times, interleaved, so a noisy moment hits both alike; the
    # figures are each side's best run (the least disturbed by the rest of the machine).
    plain_fans, cicd_fans, plain_chains, cicd_chains = [], [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ray.get([plain_step.remote() for _ in range(args.steps)])
        plain_fans.append(time.perf_counter() - t0)
        cicd_fans.append(run_pipeline(master, settings, fan_out(args.steps)))
        t0 = time.perf_counter()
        for _ in range(args.chain):
            ray.get(plain_step.remote())
        plain_chains.append(time.perf_counter() - t0)
        cicd_chains.append(run_pipeline(master, settings, chain(args.chain)))
    plain_fan, cicd_fan = min(plain_fans), min(cicd_fans)
    plain_chain, cicd_chain = min(plain_chains), min(cicd_chains)
    ratios = sorted(c / p for c, p in zip(cicd_fans, plain_fans, strict=True))

    rss_before = ray.get(master.stats.remote())["rss_mb"]
    queued = {
        "name": "bench-queued",
        "defaults": {"pool": "parked"},
        "steps": [
            {"name": f"q{i}", "run": "true", "resources": {"cpu": 1, "memory_mb": 0}}
            for i in range(args.queued)
        ],
    }
    t0 = time.perf_counter()
    run_id = session.submit(master, parse_pipeline(queued), Path("."), None, None, settings)
    submit_s = time.perf_counter() - t0
    stats = ray.get(master.stats.remote())
    ray.get(master.cancel.remote(run_id))

    print(
        f"cicd-ray dispatch benchmark (ray {ray.__version__}, {args.slots} slots each side, "
        f"best of {args.repeats}; steps isolated: {describe(parse_uids(args.step_uids))})"
    )
    print(f"{'':32}{'cicd-ray':>12}{'plain ray':>12}{'ratio':>8}")
    print(
        f"{f'{args.steps} independent true steps':32}{cicd_fan:>11.2f}s{plain_fan:>11.2f}s"
        f"{cicd_fan / plain_fan:>8.2f}"
    )
    print(f"{'  ratio of each repeat':32}{'':24}{' '.join(f'{r:.2f}' for r in ratios):>8}")
    per_cicd, per_plain = cicd_chain / args.chain * 1000, plain_chain / args.chain * 1000
    print(
        f"{f'{args.chain}-step chain, per step':32}{per_cicd:>10.1f}ms{per_plain:>10.1f}ms"
        f"{per_cicd / per_plain:>8.2f}"
    )
    print(
        f"master memory: {rss_before:.0f} MiB idle, {stats['rss_mb']:.0f} MiB with "
        f"{stats['queued'].get('parked', 0)} steps queued "
        f"(+{stats['rss_mb'] - rss_before:.0f} MiB); submitting them took {submit_s:.2f}s"
    )
    session.shutdown_embedded(master)


if __name__ == "__main__":
    main()
