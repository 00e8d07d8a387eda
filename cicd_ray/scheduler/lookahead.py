"""Look-ahead: the capacity the steps about to become ready will need, asked of the autoscaler
before they are ready (the master turns the answer into a standing resource request).
"""

from __future__ import annotations

from collections.abc import Iterable

from cicd_ray.pools import PoolConfig
from cicd_ray.records import AttemptRecord
from cicd_ray.scheduler.runbook import RunBook
from cicd_ray.scheduler.sizing import WorkerView, workers_needed
from cicd_ray.states import StepState


def upcoming(book: RunBook, running: Iterable[AttemptRecord]) -> dict[str, list[float]]:
    """Per pool, the CPUs of each queued step whose unmet needs are all running now."""
    out: dict[str, list[float]] = {}
    seen: set[tuple[str, str]] = set()
    for attempt in running:
        for name in book.dependents(attempt.run_id, attempt.step):
            step = book.step(attempt.run_id, name)
            if (attempt.run_id, name) in seen or step is None or step.state is not StepState.QUEUED:
                continue
            seen.add((attempt.run_id, name))
            run_steps = book.steps[attempt.run_id]
            if all(
                run_steps[n].state is StepState.RUNNING for n in book.unmet(attempt.run_id, name)
            ):
                out.setdefault(step.spec.pool, []).append(step.spec.cpu)
    return out


def workers_wanted(
    pools: dict[str, PoolConfig],
    coming: dict[str, list[float]],
    views: dict[str, list[WorkerView]],
    queued: dict[str, list[float]],
) -> dict[str, int]:
    """Per pool, the workers it will need with what runs, waits and is coming; only pools
    where that is more than they have."""
    out: dict[str, int] = {}
    for name, cpus in coming.items():
        future = workers_needed(pools[name], views[name], queued[name] + cpus)
        if future > len(views[name]):
            out[name] = future
    return out
