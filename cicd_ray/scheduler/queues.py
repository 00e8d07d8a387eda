"""The ready queues: per pool, one heap per project of steps whose needs are met, best first
(priority, then the older run, then pipeline order); the project whose step goes next chosen
by fair share (cicd_ray.scheduler.share); fitting with backfill; spot pools standing in.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterator
from typing import NamedTuple

from cicd_ray.pools import PoolConfig
from cicd_ray.records import RunRecord, StepRecord
from cicd_ray.scheduler.share import Share
from cicd_ray.states import StepState

# How many queued steps that do not fit a free slot are passed over, per pool and tick, in
# search of a smaller one that does (backfill); bounded so a deep queue costs little per tick.
BACKFILL_SCAN = 64
PROJECT_SCAN = 16  # of which at most this many of one project's (the others get their look)


class Entry(NamedTuple):
    """A ready step in its pool's heap (a tuple, so the heap compares it fast)."""

    neg_priority: int
    run_seq: int
    index: int
    run_id: str
    step: str


Lookup = Callable[[str, str], "StepRecord | None"]


class ReadyQueues:
    """Steps whose needs are met, waiting for a slot: per pool, a heap per project, the next
    step chosen by fair share between projects and by priority and age within one."""

    def __init__(
        self, pools: dict[str, PoolConfig], lookup: Lookup, share: Share | None = None
    ) -> None:
        self.pools = pools
        self._lookup = lookup  # (run id, step name) -> the step, None once its run is gone
        self.share = share or Share()
        self._heaps: dict[str, dict[str, list[Entry]]] = {}  # pool -> project -> heap

    def push(self, run: RunRecord, step: StepRecord, now: float) -> None:
        step.queued_at = now
        projects = self._heaps.setdefault(self.pool_for(step), {})
        heapq.heappush(
            projects.setdefault(run.project, []),
            Entry(-step.spec.priority, run.seq, step.spec.index, run.id, step.name),
        )

    def pool_for(self, step: StepRecord) -> str:
        """Where a ready step waits: a spot pool standing in for its own if it is
        interruptible, fits there, and has not lost an attempt there; else its own pool."""
        if step.spec.interruptible and not step.spot_evicted:
            for pool in self.pools.values():
                if (
                    pool.spot
                    and step.spec.pool in pool.spot_for
                    and step.spec.cpu <= pool.cpus
                    and step.spec.memory_mb <= pool.memory_mb
                ):
                    return pool.name
        return step.spec.pool

    def nonempty(self) -> list[str]:
        return [pool for pool, projects in self._heaps.items() if any(projects.values())]

    def placements(
        self, pool: str, fit: Callable[[StepRecord], object | None], room_left: Callable[[], bool]
    ) -> Iterator[tuple[StepRecord, object]]:
        """The queued steps of `pool` that `fit` finds a place for, best first, with that place.
        A step that does not fit is passed over (up to BACKFILL_SCAN) for smaller ones behind
        it, and keeps its place in the queue; the search stops when no place has room left.
        Projects take turns by `share`; a step placed counts as running for its project. The
        caller must take each step out of `queued` before asking for the next."""
        projects = self._heaps.get(pool, {})
        passed_over: list[tuple[str, Entry]] = []
        scanned: Counter[str] = Counter()
        try:
            while len(passed_over) < BACKFILL_SCAN:
                project = self.share.pick(
                    {
                        p: heap[0]
                        for p, heap in projects.items()
                        if heap and scanned[p] < PROJECT_SCAN
                    }
                )
                if project is None:
                    break
                entry = heapq.heappop(projects[project])
                step = self._queued(entry)
                if step is None:
                    continue  # cancelled or skipped while it waited
                place = fit(step)
                if place is None:
                    passed_over.append((project, entry))
                    scanned[project] += 1
                    if not room_left():
                        break
                    continue
                self.share.running[project] += 1
                yield step, place
        finally:
            for project, entry in passed_over:
                heapq.heappush(projects[project], entry)

    def waiting(self, pool: str) -> list[StepRecord]:
        """The steps still queued in a pool (entries of steps that moved on are stale)."""
        entries = (e for heap in self._heaps.get(pool, {}).values() for e in heap)
        return [s for s in map(self._queued, entries) if s is not None]

    def view(self, now: float) -> dict[str, dict]:
        """Per pool: steps ready and waiting for a slot, and how long the oldest has waited."""
        out: dict[str, dict] = {name: {"queued": 0, "oldest_wait_s": 0.0} for name in self.pools}
        for pool in self._heaps:
            waits = [now - s.queued_at for s in self.waiting(pool)]
            out[pool] = {"queued": len(waits), "oldest_wait_s": round(max(waits, default=0.0), 3)}
        return out

    def _queued(self, entry: Entry) -> StepRecord | None:
        step = self._lookup(entry.run_id, entry.step)
        return step if step is not None and step.state is StepState.QUEUED else None
