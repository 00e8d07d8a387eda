"""Fair share between projects: how long a small project's one-step run waits behind a big
project's 1,000-step run queued first, with fair share on and off (the baseline), each on an
embedded local cluster of its own (a pool of 2 workers x 2 CPUs: 4 slots):

    python bench/share.py [--steps 1000] [--step-s 0.2]

Project A submits one run of `--steps` independent steps of `sleep STEP_S`; once they fill
every slot, project B submits one run of one step. B's wait is from its submission to its
step's start. With fair share off, B's step is behind all of A's (the older run); with it on,
B takes the next slot that frees. A is cancelled once B's step has started.
"""

from __future__ import annotations

import argparse
import time

import ray
from common import local_cluster

from cicd_ray.protocol import SubmitCommand, Submitted
from cicd_ray.records import Caller


def submit(master, doc: dict, project: str) -> str:
    answer = ray.get(
        master.submit.remote(
            SubmitCommand(
                pipeline=doc, caller=Caller(project=project, admin=False), project=project
            )
        )
    )
    assert isinstance(answer, Submitted), answer
    return answer.run_id


def step_of(master, run_id: str, name: str):
    view = ray.get(master.get_run.remote(run_id))
    return next(s for s in view.steps if s.name == name)


def wait_of_b(fair: bool, steps: int, step_s: float) -> tuple[float, int]:
    """(B's wait in seconds, how many of A's steps had started by then)."""
    with local_cluster(fair_share=fair) as (_, master, _):
        submit(master, {"name": "warm-up", "steps": [{"name": "a", "run": "true"}]}, "a")
        big = submit(
            master,
            {
                "name": "big",
                "steps": [{"name": f"s{i}", "run": f"sleep {step_s}"} for i in range(steps)],
            },
            "a",
        )
        while (
            sum(s.state.value == "running" for s in ray.get(master.get_run.remote(big)).steps) < 4
        ):
            time.sleep(0.01)
        t0 = time.time()
        small = submit(master, {"name": "fix", "steps": [{"name": "fix", "run": "true"}]}, "b")
        while (fix := step_of(master, small, "fix")).started_at is None:
            time.sleep(0.01)
        ahead = sum(
            s.started_at is not None and s.started_at <= fix.started_at
            for s in ray.get(master.get_run.remote(big)).steps
        )
        ray.get(master.cancel.remote(big))
        return fix.started_at - t0, ahead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--step-s", type=float, default=0.2)
    args = parser.parse_args()
    on, ahead_on = wait_of_b(True, args.steps, args.step_s)
    off, ahead_off = wait_of_b(False, args.steps, args.step_s)
    print(
        f"project B's one-step run behind project A's {args.steps} steps of "
        f"{args.step_s:g} s on 4 slots: B waited {on:.2f} s with fair share "
        f"({ahead_on} of A's steps started before it), {off:.2f} s without "
        f"({ahead_off} of A's steps started before it); ratio {off / on:.0f}x"
    )


if __name__ == "__main__":
    main()
