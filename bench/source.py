"""Submit-to-first-step time of a run with a large source snapshot, against the same run
without one.

    python bench/source.py [--mib 100] [--runs 3]

On the embedded local cluster of bench/common.py, a folder of MIB mebibytes of random bytes
(incompressible, so the archive is as large) is the source of a one-step pipeline whose step
prints the time it starts. Timed from the call that submits (which packs the folder) to that
time, for each run, with the time packing alone takes measured apart. The baseline, in the same
process: the same pipeline with no source. Prints the medians and the source's cost (with
source minus without, and that minus packing: what moving the snapshot to the step costs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import ray
from common import local_cluster

from cicd_ray.config import Settings
from cicd_ray.source import snapshot

try:
    from cicd_ray.cluster import session  # the package's layout since issue 25
    from cicd_ray.pipeline.load import parse_pipeline
except ImportError:  # the layout before it, to measure the old path the same way
    from cicd_ray.spec import parse_pipeline

    from cicd_ray import cluster as session

PIPELINE = {
    "name": "big-source",
    "steps": [{"name": "first", "run": "python3 -c 'import time; print(repr(time.time()))'"}],
}


def first_step_s(master, settings: Settings, work: Path, source: Path | None) -> float:
    """Seconds from the submit call to the moment the step started."""
    t0 = time.time()
    run_id = session.submit(master, parse_pipeline(PIPELINE), work, source, None, settings)
    while True:
        view = ray.get(master.get_run.remote(run_id))
        if view.run.state.terminal:
            break
        time.sleep(0.05)
    assert view.run.state.value == "succeeded", view.run.reason
    log = ray.get(master.step_log.remote(run_id, "first", None, 0)).data.decode()
    started = float(log.strip().splitlines()[-1])
    return started - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=100, help="the source's size")
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind")
    args = parser.parse_args()
    limit = (args.mib + 50) * 2**20
    with local_cluster(source_limit_bytes=limit) as (settings, master, work):
        folder = work / "source"
        folder.mkdir()
        for i in range(args.mib):
            (folder / f"blob-{i:04d}").write_bytes(os.urandom(2**20))
        first_step_s(master, settings, work, None)  # the workers are warm from here on
        packing, with_source, without = [], [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            snapshot(folder, limit)
            packing.append(time.perf_counter() - t0)
            with_source.append(first_step_s(master, settings, work, folder))
            without.append(first_step_s(master, settings, work, None))
    pack, big, none = (statistics.median(x) for x in (packing, with_source, without))
    print(f"{args.mib} MiB source, median of {args.runs} runs, submit to first step:")
    print(f"  with the source      {big:.2f} s")
    print(f"  without a source     {none:.2f} s   (the baseline)")
    print(f"  packing alone        {pack:.2f} s")
    print(f"  the source's cost    {big - none:.2f} s; without packing {big - none - pack:.2f} s")
    print(f"  ratio with/without   {big / none:.1f}")


if __name__ == "__main__":
    main()
