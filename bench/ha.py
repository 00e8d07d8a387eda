"""Recovery times on a cluster shaped like an HA deployment (head with GCS fault tolerance on
Redis and no CPUs, two worker nodes carrying the master and the workers; see
tests.integration.clusters.py), measured from outside as a user sees them, through the API.

    python bench/ha.py [--rounds 3]

- GCS restart to first dispatch: the GCS and the master are both killed (the master cannot be
  restarted without the GCS); from the GCS's restart, a client submits (retrying its 503s) until
  the run's step is running. Baseline in the same run: the master alone killed, from its kill
  to the step running (its own restart). Their ratio is the GCS's share.
- Submit to start while the GCS is down (the master alive) against the GCS up: dispatch to
  live workers does not need the GCS.
- Head replaced: every head process killed, then `cicd-ray up --ha` again: from the kill to the
  API answering, and on to a new run's step running.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.clusters import HaCluster, start_redis

ONE_STEP = {"name": "probe", "steps": [{"name": "a", "run": "echo probe"}]}


def until_running(ha: HaCluster, t0: float) -> float:
    """Submit (retrying while the API answers 503) and wait for the step to have started."""
    run_id = ha.submit({**ONE_STEP, "name": f"probe-{time.monotonic_ns()}"}, retries_s=120)
    while True:
        view = ha.view(run_id)
        if view and view["steps"][0]["state"] in ("running", "succeeded"):
            return time.monotonic() - t0
        time.sleep(0.02)


def kill_master(ha: HaCluster) -> None:
    [pid] = ha.actor_pids("ray::Master")
    os.kill(pid, signal.SIGKILL)
    ha.wait_for(lambda: pid not in ha.actor_pids("ray::Master"))


def settle(ha: HaCluster) -> None:
    ha.wait_healthy()
    until_running(ha, time.monotonic())  # a full round trip before the next measurement
    time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cicd-bench-ha-"))
    redis_url, redis = start_redis(tmp)
    ha = HaCluster(tmp, redis_url)
    try:
        ha.start(nodes=2, cpus=2)
        settle(ha)
        figures: dict[str, list[float]] = {
            k: []
            for k in (
                "master",
                "gcs+master",
                "submit-gcs-up",
                "submit-gcs-down",
                "head-api",
                "head-run",
            )
        }
        for _ in range(args.rounds):
            t0 = time.monotonic()
            kill_master(ha)
            figures["master"].append(until_running(ha, t0))
            settle(ha)

            ha.kill_gcs()
            kill_master(ha)
            time.sleep(2)
            ha.restart_gcs()
            figures["gcs+master"].append(until_running(ha, time.monotonic()))
            settle(ha)

            figures["submit-gcs-up"].append(until_running(ha, time.monotonic()))
            ha.kill_gcs()
            try:
                figures["submit-gcs-down"].append(until_running(ha, time.monotonic()))
            finally:
                ha.restart_gcs()
            settle(ha)

            t0 = time.monotonic()
            ha.kill_head()
            done = ha.up()
            assert done.returncode == 0, done.stdout + done.stderr
            figures["head-api"].append(time.monotonic() - t0)
            figures["head-run"].append(until_running(ha, t0))
            settle(ha)
    finally:
        ha.stop()
        redis.terminate()

    def med(key: str) -> float:
        return statistics.median(figures[key])

    print(f"rounds: {args.rounds} (medians; all values {figures})")
    print(f"master killed -> a new run's step running:        {med('master'):6.2f} s")
    print(
        f"GCS restarted (it and the master were killed) -> step running: "
        f"{med('gcs+master'):6.2f} s  (ratio to the master alone: "
        f"{med('gcs+master') / med('master'):.2f})"
    )
    print(
        f"submit -> step running, GCS up:                    {med('submit-gcs-up') * 1e3:6.0f} ms"
    )
    print(
        f"submit -> step running, GCS down:                  "
        f"{med('submit-gcs-down') * 1e3:6.0f} ms  (ratio "
        f"{med('submit-gcs-down') / med('submit-gcs-up'):.2f})"
    )
    print(f"head killed -> `up --ha` replaced it, API answers: {med('head-api'):6.2f} s")
    print(f"head killed -> a new run's step running:           {med('head-run'):6.2f} s")


if __name__ == "__main__":
    main()
