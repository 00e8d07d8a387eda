"""How long the master takes to answer again after it is killed, against a cold start.

    python bench/recovery.py [--kills 5]

On a local cluster with a run in progress (one step that sleeps through the kills), the master
is killed with `ray.kill(..., no_restart=False)` (its process dies; Ray restarts it) and timed
until `ping` answers again. The baseline, in the same run: creating a master from nothing (a
second detached master under another name, on an empty store) until it answers. Also checks
that the run still succeeds with its step run once.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray

from cicd_ray.cli.connect import RayRunner, follow_run
from cicd_ray.cluster import session
from cicd_ray.config import Settings
from cicd_ray.master.actor import Master
from cicd_ray.names import NAMESPACE
from cicd_ray.pipeline.load import parse_pipeline


def until_answers(handle, not_pid: int | None = None) -> float:
    """Seconds until `ping` answers from a process other than `not_pid` (a killed master's
    process may still answer a call that reaches it before the kill does)."""
    t0 = time.perf_counter()
    while True:
        try:
            if ray.get(handle.ping.remote(), timeout=5)["pid"] != not_pid:
                return time.perf_counter() - t0
        except ray.exceptions.RayError:
            pass
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()
    settings = Settings(home=Path(tempfile.mkdtemp(prefix="cicd-bench-recovery-")))
    session.connect(settings=settings, num_cpus=6)
    master = session.ensure_master(settings)
    doc = {"name": "survive", "steps": [{"name": "long", "run": f"sleep {3 * args.kills + 5}"}]}
    run_id = session.submit(master, parse_pipeline(doc), Path("."), None, None, settings)
    while ray.get(master.get_run.remote(run_id)).steps[0].state.value != "running":
        time.sleep(0.05)

    restarts = []
    for _ in range(args.kills):
        pid = ray.get(master.ping.remote())["pid"]
        ray.kill(master, no_restart=False)
        restarts.append(until_answers(master, not_pid=pid))
        time.sleep(2)  # let the workers re-register before the next kill

    colds = []
    for i in range(args.kills):
        other = Settings(home=Path(tempfile.mkdtemp(prefix="cicd-bench-cold-")), pools={})
        t0 = time.perf_counter()
        fresh = (
            ray.remote(Master)
            .options(name=f"cold-{i}", namespace=NAMESPACE, num_cpus=0, max_restarts=-1)
            .remote(other)
        )
        until_answers(fresh)
        colds.append(time.perf_counter() - t0)
        ray.kill(fresh)

    view = follow_run(RayRunner(master, settings), run_id).model_dump(mode="json")
    print(f"cicd-ray master recovery ({args.kills} kills, ray {ray.__version__})")
    print(f"{'':34}{'median':>10}{'max':>10}")
    print(
        f"{'killed -> answering again':34}{statistics.median(restarts):>9.2f}s"
        f"{max(restarts):>9.2f}s"
    )
    print(
        f"{'cold start -> answering (baseline)':34}{statistics.median(colds):>9.2f}s"
        f"{max(colds):>9.2f}s"
    )
    print(f"{'ratio':34}{statistics.median(restarts) / statistics.median(colds):>10.2f}")
    step = view["steps"][0]
    print(
        f"the run: {view['run']['state']}, its step ran {step['attempts']} time(s) "
        f"through {args.kills} master restarts"
    )
    session.shutdown_embedded(master)


if __name__ == "__main__":
    main()
