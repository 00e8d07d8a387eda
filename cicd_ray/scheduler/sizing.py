"""The pool sizer: how many worker actors each pool should have, from its queue.

Pure and clock-free like the scheduler that calls it: the time is passed in. Growing is quick
(as soon as steps wait, up to `scale_up_step` workers at a time, one batch per `cooldown_s`);
shrinking is slow (only below the highest need seen over the last `window_s`, and only workers
idle for `idle_timeout_s`), so a pool does not flap between two runs. A pool never goes below
`min_workers`, above `max_workers`, or above what `budget_per_hour` buys at
`price_per_hour`. Workers the cluster cannot place stay `starting`: that is the pending demand
the Ray autoscaler turns into nodes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from cicd_ray.pools import PoolConfig


@dataclass
class WorkerView:
    """One live worker as the sizer sees it."""

    id: str
    ready: bool  # False: started but not placed or not up yet
    started_at: float
    busy_cpu: float = 0.0
    busy_steps: int = 0
    idle_since: float | None = None  # None while it runs something


@dataclass
class PoolMemory:
    """What the sizer remembers of a pool between decisions."""

    last_scale_up: float = -math.inf
    needs: deque[tuple[float, int]] = field(default_factory=deque)  # (time, workers needed)


@dataclass
class Sizing:
    needed: int  # workers the queue and the running steps call for, within the limits
    start: int = 0
    retire: list[str] = field(default_factory=list)
    why: str = ""


def cap(pool: PoolConfig) -> int:
    """The most workers the pool may have: its maximum, or fewer if its budget says so."""
    if pool.budget_per_hour is not None and pool.price_per_hour > 0:
        return min(pool.max_workers, math.floor(pool.budget_per_hour / pool.price_per_hour + 1e-9))
    return pool.max_workers


def workers_needed(pool: PoolConfig, workers: list[WorkerView], queued_cpu: list[float]) -> int:
    """Workers enough for what runs and what waits, packed by CPU (and by slots, if set)."""
    per_worker = pool.cpus * pool.target_utilization
    cpu = sum(w.busy_cpu for w in workers) + sum(queued_cpu)
    need = math.ceil(cpu / per_worker - 1e-9) if cpu > 0 else 0
    if pool.slots:
        steps = sum(w.busy_steps for w in workers) + len(queued_cpu)
        need = max(need, math.ceil(steps / pool.slots))
    return max(pool.min_workers, min(need, cap(pool)))


def size_pool(
    pool: PoolConfig,
    workers: list[WorkerView],
    queued_cpu: list[float],
    memory: PoolMemory,
    now: float,
) -> Sizing:
    """Start or retire workers of one pool. `memory` is updated in place."""
    needed = workers_needed(pool, workers, queued_cpu)
    memory.needs.append((now, needed))
    while memory.needs and memory.needs[0][0] < now - pool.window_s:
        memory.needs.popleft()
    have = len(workers)
    if needed > have:
        below_min = pool.min_workers - have  # lost workers are replaced at once
        if now - memory.last_scale_up < pool.cooldown_s and below_min <= 0:
            return Sizing(needed, why=f"cooling down: {have} of {needed} workers")
        start = max(below_min, min(needed - have, pool.scale_up_step))
        if start > below_min:  # growing for the queue arms the cooldown; refilling does not
            memory.last_scale_up = now
        return Sizing(
            needed,
            start=start,
            why=f"{len(queued_cpu)} step(s) queued: {have} -> {have + start} of {needed} workers",
        )
    # Shrink only below the highest need of the window, and never below the budget's cap.
    keep = min(max(n for _, n in memory.needs), cap(pool))
    if have <= keep:
        return Sizing(needed)
    # Workers not yet up go first (their pending demand is withdrawn), then the longest idle.
    pending = sorted((w for w in workers if not w.ready), key=lambda w: -w.started_at)
    idle = sorted(
        (
            w
            for w in workers
            if w.ready and w.idle_since is not None and now - w.idle_since >= pool.idle_timeout_s
        ),
        key=lambda w: w.idle_since,
    )
    retire = [w.id for w in [*pending, *idle]][: have - keep]
    why = f"{have} workers, {keep} needed over the last {pool.window_s:g} s" if retire else ""
    return Sizing(needed, retire=retire, why=why)


def preempt(
    pools: dict[str, PoolConfig], workers: dict[str, list[WorkerView]], now: float, after_s: float
) -> list[str]:
    """When a pool's workers have waited `after_s` to be placed (the cluster is full), retire
    idle workers of lower-priority pools, above their minimum, to make room for them."""
    waiting = [
        name
        for name, views in workers.items()
        if name in pools and any(not w.ready and now - w.started_at >= after_s for w in views)
    ]
    if not waiting:
        return []
    top = max(pools[name].priority for name in waiting)
    out: list[str] = []
    for name, views in workers.items():
        pool = pools.get(name)
        if pool is None or pool.priority >= top:
            continue
        spare = len(views) - pool.min_workers
        idle = sorted(
            (w for w in views if w.ready and w.idle_since is not None), key=lambda w: w.idle_since
        )
        out += [w.id for w in idle[: max(0, spare)]]
    return out
