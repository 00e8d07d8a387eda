"""The slots: the workers of every pool, what each has in use (one reserve/release pair),
heartbeats and silence, starting and retiring workers as sizing says, and which attempts a
worker must confirm after a master restart.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from cicd_ray.pipeline.model import PlannedStep
from cicd_ray.pools import PoolConfig
from cicd_ray.records import WorkerRecord
from cicd_ray.scheduler.decisions import Decisions
from cicd_ray.scheduler.sizing import PoolMemory, WorkerView, preempt, size_pool
from cicd_ray.states import WorkerState, move

# A worker that has waited this long to be placed means the cluster is full (a new node takes
# less): idle workers of lower-priority pools then make room for it.
PREEMPT_AFTER_S = 60.0
LIVE = (WorkerState.STARTING, WorkerState.READY)


@dataclass
class Load:
    cpu: float = 0.0
    memory_mb: int = 0
    attempts: set[str] = field(default_factory=set)
    idle_since: float | None = None


def check_fits(steps: list[PlannedStep], pools: dict[str, PoolConfig]) -> list[str]:
    """Steps no worker could ever run: an unknown pool, or a step too big for any worker."""
    problems: list[str] = []
    known = ", ".join(sorted(pools)) or "(none)"
    reported: set[tuple[str, str]] = set()
    for s in steps:
        pool = pools.get(s.pool)
        if pool is None:
            if (s.base, "pool") not in reported:
                problems.append(
                    f"steps ({s.base}).pool: unknown pool {s.pool!r}; configured pools are: {known}"
                )
            reported.add((s.base, "pool"))
            continue
        if s.cpu > pool.cpus and (s.base, "cpu") not in reported:
            reported.add((s.base, "cpu"))
            problems.append(
                f"steps ({s.base}).resources.cpu: {s.cpu:g} is more than a worker of "
                f"pool {s.pool!r} has ({pool.cpus:g}); ask for at most {pool.cpus:g}"
            )
        if s.memory_mb > pool.memory_mb and (s.base, "mem") not in reported:
            reported.add((s.base, "mem"))
            problems.append(
                f"steps ({s.base}).resources.memory_mb: {s.memory_mb} is more than a "
                f"worker of pool {s.pool!r} has ({pool.memory_mb}); ask for at most "
                f"{pool.memory_mb}"
            )
    return problems


NETWORK = ("net_sent_bytes", "net_recv_bytes", "net_sent_bytes_per_s", "net_recv_bytes_per_s")


class Slots:
    """The workers of every pool and their slots: what each has reserved, which are silent, how
    many each pool should have (the sizer), and where a step fits best."""

    def __init__(
        self, pools: dict[str, PoolConfig], heartbeat_timeout_s: float, out: Decisions
    ) -> None:
        self.pools = pools
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.out = out
        self.workers: dict[str, WorkerRecord] = {}
        self._load: dict[str, Load] = {}
        self._gone: set[str] = set()  # workers lost or retired: stopped if they call again
        # Attempts restored from the store whose worker has not yet confirmed it runs them.
        self._unconfirmed: set[str] = set()
        self._sizing: dict[str, PoolMemory] = {name: PoolMemory() for name in pools}

    # --- what a worker holds --------------------------------------------------------------

    def reserve(self, worker_id: str, attempt_id: str, spec: PlannedStep) -> bool:
        """Count an attempt on its worker; False when the worker is not (or no longer) known."""
        load = self._load.get(worker_id)
        if load is None:
            return False
        load.cpu += spec.cpu
        load.memory_mb += spec.memory_mb
        load.attempts.add(attempt_id)
        load.idle_since = None
        return True

    def release(self, worker_id: str, attempt_id: str, spec: PlannedStep, now: float) -> None:
        """Free the slot an attempt held."""
        self._unconfirmed.discard(attempt_id)
        load = self._load.get(worker_id)
        if load is not None and attempt_id in load.attempts:
            load.attempts.discard(attempt_id)
            load.cpu -= spec.cpu
            load.memory_mb -= spec.memory_mb
            if not load.attempts:
                load.idle_since = now

    def attempts_on(self, worker_id: str) -> list[str]:
        return sorted(self._load[worker_id].attempts) if worker_id in self._load else []

    def load_of(self, worker_id: str) -> tuple[float, list[str]]:
        load = self._load.get(worker_id, Load())
        return load.cpu, sorted(load.attempts)

    # --- placement ------------------------------------------------------------------------

    def ready_in(self, pool: str) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.pool == pool and w.state is WorkerState.READY]

    def least_loaded(self, workers: list[WorkerRecord], spec: PlannedStep) -> WorkerRecord | None:
        best, best_key = None, None
        for w in workers:
            load = self._load[w.id]
            if (
                load.cpu + spec.cpu > w.cpus + 1e-9
                or load.memory_mb + spec.memory_mb > w.memory_mb
                or self._slots_full(w)
            ):
                continue
            key = (load.cpu / w.cpus, len(load.attempts), w.id)
            if best_key is None or key < best_key:
                best, best_key = w, key
        return best

    def any_room(self, workers: list[WorkerRecord]) -> bool:
        return any(self._load[w.id].cpu < w.cpus and not self._slots_full(w) for w in workers)

    def _slots_full(self, worker: WorkerRecord) -> bool:
        pool = self.pools.get(worker.pool)
        return bool(pool and pool.slots and len(self._load[worker.id].attempts) >= pool.slots)

    # --- joining, beating, leaving --------------------------------------------------------

    def register(self, worker: WorkerRecord, now: float) -> bool:
        """A worker (re)joins; False (and told to stop) if it is of no pool we keep, or one
        we gave up on or retired."""
        if worker.pool not in self.pools or worker.id in self._gone:
            self.out.stop_workers.append(worker.id)
            return False
        known = self.workers.get(worker.id)
        move(worker, WorkerState.READY)
        worker.last_heartbeat = now
        if known is not None:
            worker.started_at = known.started_at
            worker.ready_at = known.ready_at
            worker.reason = known.reason
        worker.ready_at = worker.ready_at or now
        self.workers[worker.id] = worker
        load = self._load.setdefault(worker.id, Load())
        if not load.attempts and load.idle_since is None:
            load.idle_since = now
        self.out.record(worker)
        return True

    def heartbeat(self, worker_id: str, usage: dict[str, float], now: float) -> bool:
        """Note a heartbeat; False when the worker is not (or no longer) known as ready."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.state is not WorkerState.READY:
            return False
        worker.last_heartbeat = now
        worker.cpu_percent = usage.get("cpu_percent")
        worker.memory_used_mb = usage.get("memory_used_mb")
        worker.disk_used_percent = usage.get("disk_used_percent")
        for name in NETWORK:
            setattr(worker, name, usage.get(name))
        self.out.record(worker)
        return True

    def silent(self, now: float) -> list[tuple[str, float]]:
        """(worker id, seconds since its last heartbeat) of ready workers past the timeout."""
        return [
            (w.id, now - w.last_heartbeat)
            for w in self.workers.values()
            if w.state is WorkerState.READY
            and w.last_heartbeat is not None
            and now - w.last_heartbeat > self.heartbeat_timeout_s
        ]

    def let_go(self, worker_id: str, state: WorkerState, reason: str, now: float) -> list[str]:
        """Stop a worker for good (lost or retired); returns the attempts it held. The store
        keeps its record."""
        worker = self.workers.pop(worker_id)
        move(worker, state)
        worker.stopped_at = now
        worker.reason = reason
        self.out.record(worker)
        self.out.stop_workers.append(worker.id)
        self._gone.add(worker.id)
        return sorted(self._load.pop(worker_id, Load()).attempts)

    # --- recovery -------------------------------------------------------------------------

    def restore(self, workers: list[WorkerRecord], now: float) -> None:
        """Take up the workers the store knows; they must register again before they get work."""
        for w in workers:
            if w.state in LIVE:
                w.last_heartbeat = now  # a fresh grace period: heartbeats stopped with us
                self.workers[w.id] = w
                self._load[w.id] = Load(idle_since=now)
            else:
                self._gone.add(w.id)

    def unconfirmed(self, attempt_id: str) -> None:
        """A restored attempt: its worker must say it still runs it (see `unconfirmed_on`)."""
        self._unconfirmed.add(attempt_id)

    def unconfirmed_on(self, worker_id: str, running: list[str]) -> list[str]:
        """The restored attempts of a worker that registered again without them; the others it
        names are confirmed."""
        held = self.attempts_on(worker_id)
        missing = [a for a in held if a in self._unconfirmed and a not in running]
        self._unconfirmed -= set(held) | set(running)
        return missing

    # --- sizing ---------------------------------------------------------------------------

    def views(self) -> dict[str, list[WorkerView]]:
        """The live workers of each pool, as the sizer sees them."""
        views: dict[str, list[WorkerView]] = {name: [] for name in self.pools}
        for w in self.workers.values():
            if w.pool in views and w.state in LIVE:
                load = self._load.get(w.id, Load())
                views[w.pool].append(
                    WorkerView(
                        id=w.id,
                        ready=w.state is WorkerState.READY,
                        started_at=w.started_at,
                        busy_cpu=load.cpu,
                        busy_steps=len(load.attempts),
                        idle_since=load.idle_since if not load.attempts else None,
                    )
                )
        return views

    def size(self, queued_cpu: dict[str, list[float]], now: float) -> None:
        """Start and retire workers per pool from its queue (see cicd_ray.scheduler.sizing)."""
        views = self.views()
        for worker_id in preempt(self.pools, views, now, PREEMPT_AFTER_S):
            self.let_go(
                worker_id,
                WorkerState.STOPPED,
                "retired to make room for a higher-priority pool",
                now,
            )
            for pool_views in views.values():
                pool_views[:] = [v for v in pool_views if v.id != worker_id]
        for pool in self.pools.values():
            sizing = size_pool(
                pool, views[pool.name], queued_cpu.get(pool.name, []), self._sizing[pool.name], now
            )
            for worker_id in sizing.retire:
                self.let_go(worker_id, WorkerState.STOPPED, f"retired: {sizing.why}", now)
            for _ in range(sizing.start):
                worker = WorkerRecord(
                    id=f"{pool.name}-{uuid.uuid4().hex[:8]}",
                    pool=pool.name,
                    cpus=pool.cpus,
                    memory_mb=pool.memory_mb,
                    started_at=now,
                    reason=f"started: {sizing.why}",
                )
                self.workers[worker.id] = worker
                self.out.record(worker)
                self.out.start_workers.append(worker)
