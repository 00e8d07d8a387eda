"""The pure scheduling policy: DAG order, priorities, placement, retries, skips, pool sizes.

No Ray here and no clock: every method takes `now`. Methods change the scheduler's view and
collect what must happen in a `Decisions` batch; the master takes the batch with `take()`,
writes its records to the store, and only then dispatches, kills, starts or stops anything.
"""

from __future__ import annotations

import heapq
import uuid
from dataclasses import dataclass, field

from cicd_ray.config import PoolConfig
from cicd_ray.records import (
    AttemptRecord,
    Changes,
    RunRecord,
    StepOutcome,
    StepRecord,
    StepTask,
    WorkerRecord,
)
from cicd_ray.retries import verdict
from cicd_ray.sizing import PoolMemory, WorkerView, preempt, size_pool, workers_needed
from cicd_ray.spec import PlannedStep
from cicd_ray.states import RunState, StepState, WorkerState, transition

# How many queued steps that do not fit a free slot are passed over, per pool and tick, in
# search of a smaller one that does (backfill); bounded so a deep queue costs little per tick.
BACKFILL_SCAN = 64
# A worker that has waited this long to be placed means the cluster is full (a new node takes
# less): idle workers of lower-priority pools then make room for it.
PREEMPT_AFTER_S = 60.0


@dataclass
class Kill:
    attempt_id: str
    worker_id: str


@dataclass
class Decisions:
    changes: Changes = field(default_factory=Changes)
    dispatch: list[tuple[str, StepTask]] = field(default_factory=list)  # (worker_id, task)
    kill: list[Kill] = field(default_factory=list)
    start_workers: list[WorkerRecord] = field(default_factory=list)
    stop_workers: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.changes or self.dispatch or self.kill or self.start_workers
                    or self.stop_workers)


@dataclass
class _Load:
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
                problems.append(f"steps ({s.base}).pool: unknown pool {s.pool!r}; "
                                f"configured pools are: {known}")
            reported.add((s.base, "pool"))
            continue
        if s.cpu > pool.cpus and (s.base, "cpu") not in reported:
            reported.add((s.base, "cpu"))
            problems.append(f"steps ({s.base}).resources.cpu: {s.cpu:g} is more than a worker of "
                            f"pool {s.pool!r} has ({pool.cpus:g}); ask for at most {pool.cpus:g}")
        if s.memory_mb > pool.memory_mb and (s.base, "mem") not in reported:
            reported.add((s.base, "mem"))
            problems.append(f"steps ({s.base}).resources.memory_mb: {s.memory_mb} is more than a "
                            f"worker of pool {s.pool!r} has ({pool.memory_mb}); ask for at most "
                            f"{pool.memory_mb}")
    return problems


class Scheduler:
    def __init__(self, pools: dict[str, PoolConfig], heartbeat_timeout_s: float = 15.0,
                 lookahead: bool = True) -> None:
        self.pools = pools
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.lookahead_on = lookahead  # CICD_RAY_LOOKAHEAD
        self.runs: dict[str, RunRecord] = {}
        self.steps: dict[str, dict[str, StepRecord]] = {}
        self.attempts: dict[str, AttemptRecord] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self._load: dict[str, _Load] = {}
        self._unmet: dict[tuple[str, str], set[str]] = {}
        self._dependents: dict[tuple[str, str], list[str]] = {}
        self._ready: dict[str, list[tuple[int, int, int, str, str]]] = {}
        self._open_steps: dict[str, int] = {}
        self._seq = 0
        self._out = Decisions()
        # Attempts restored from the store whose worker has not yet confirmed it runs them.
        self._unconfirmed: set[str] = set()
        self._sizing: dict[str, PoolMemory] = {name: PoolMemory() for name in pools}
        self._gone: set[str] = set()  # workers lost or retired: stopped if they call again

    # --- taking decisions out -------------------------------------------------------------

    def take(self) -> Decisions:
        out, self._out = self._out, Decisions()
        return out

    def _record(self, record: RunRecord | StepRecord | AttemptRecord | WorkerRecord) -> None:
        self._out.changes.add(record)

    # --- runs -------------------------------------------------------------------------------

    def submit(self, run: RunRecord, planned: list[PlannedStep], now: float) -> None:
        """Accept a new run (the caller has checked `check_fits`)."""
        self._seq = max(self._seq, run.seq) + 1
        run.seq = self._seq
        steps = [StepRecord(run_id=run.id, spec=p, queued_at=now) for p in planned]
        self._adopt(run, steps)
        self._record(run)
        for s in steps:
            self._record(s)
        self._release_ready(run.id, [s.name for s in steps if not s.spec.needs], now)

    def _adopt(self, run: RunRecord, steps: list[StepRecord]) -> None:
        self.runs[run.id] = run
        self.steps[run.id] = {s.name: s for s in steps}
        self._open_steps[run.id] = sum(1 for s in steps if not s.state.terminal)
        for s in steps:
            self._unmet[(run.id, s.name)] = set(s.spec.needs)
            for need in s.spec.needs:
                self._dependents.setdefault((run.id, need), []).append(s.name)

    def _release_ready(self, run_id: str, names: list[str], now: float) -> None:
        run = self.runs[run_id]
        for name in names:
            step = self.steps[run_id][name]
            step.queued_at = now
            heapq.heappush(self._ready.setdefault(self._pool_for(step), []),
                           (-step.spec.priority, run.seq, step.spec.index, run_id, name))

    def _pool_for(self, step: StepRecord) -> str:
        """Where a ready step waits: a spot pool standing in for its own if it is
        interruptible, fits there, and has not lost an attempt there; else its own pool."""
        if step.spec.interruptible and not step.spot_evicted:
            for pool in self.pools.values():
                if (pool.spot and step.spec.pool in pool.spot_for
                        and step.spec.cpu <= pool.cpus and step.spec.memory_mb <= pool.memory_mb):
                    return pool.name
        return step.spec.pool

    def cancel(self, run_id: str, now: float) -> RunRecord | None:
        """Cancel a run: queued steps at once, running steps once their worker kills them."""
        run = self.runs.get(run_id)
        if run is None or run.state.terminal or run.cancel_requested:
            return run
        run.cancel_requested = True
        run.reason = "cancelled by request"
        self._record(run)
        for step in self.steps[run_id].values():
            if step.state is StepState.QUEUED:
                self._finish_step(step, StepState.CANCELLED, now, reason="run cancelled")
            elif step.state is StepState.RUNNING and step.current_attempt:
                self._out.kill.append(Kill(step.current_attempt, step.worker_id or ""))
        self._maybe_finish_run(run_id, now)
        return run

    # --- workers ----------------------------------------------------------------------------

    def register_worker(self, worker: WorkerRecord, now: float) -> None:
        known = self.workers.get(worker.id)
        if worker.pool not in self.pools or worker.id in self._gone:
            # A worker of no pool we keep, or one we gave up on or retired: stop it.
            self._out.stop_workers.append(worker.id)
            return
        worker.state = WorkerState.READY
        worker.last_heartbeat = now
        if known is not None:
            worker.started_at = known.started_at
            worker.ready_at = known.ready_at
            worker.reason = known.reason
        worker.ready_at = worker.ready_at or now
        self.workers[worker.id] = worker
        load = self._load.setdefault(worker.id, _Load())
        if not load.attempts and load.idle_since is None:
            load.idle_since = now
        self._record(worker)

    def heartbeat(self, worker_id: str, usage: dict[str, float], now: float) -> bool:
        """Note a heartbeat; False when the worker is not (or no longer) known as ready."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.state is not WorkerState.READY:
            return False
        worker.last_heartbeat = now
        worker.cpu_percent = usage.get("cpu_percent")
        worker.memory_used_mb = usage.get("memory_used_mb")
        worker.disk_used_percent = usage.get("disk_used_percent")
        self._record(worker)
        return True

    def worker_lost(self, worker_id: str, reason: str, now: float) -> None:
        """The worker died or went silent: its steps are retried as infra failures or fail."""
        worker = self.workers.get(worker_id)
        if worker is None:  # unknown, or already let go (and so no longer here)
            return
        self._let_go(worker, WorkerState.LOST, f"lost: {reason}", now)
        for attempt_id in list(self._load.pop(worker_id, _Load()).attempts):
            attempt = self.attempts.get(attempt_id)
            if attempt is not None:
                self._end_attempt(attempt, StepState.FAILED, now, infra=True,
                                  reason=f"worker {worker_id} lost: {reason}")

    def _let_go(self, worker: WorkerRecord, state: WorkerState, reason: str,
                now: float) -> None:
        """Stop a worker for good (lost or retired); the store keeps its record."""
        worker.state = state
        worker.stopped_at = now
        worker.reason = reason
        self._record(worker)
        self._out.stop_workers.append(worker.id)
        self.workers.pop(worker.id, None)
        self._gone.add(worker.id)

    # --- outcomes ---------------------------------------------------------------------------

    def on_outcome(self, outcome: StepOutcome, now: float) -> bool:
        """Apply a worker's report once. A stale or duplicate report is ignored (False)."""
        attempt = self.attempts.get(outcome.attempt_id)
        if attempt is None or attempt.state is not StepState.RUNNING:
            return False
        attempt.exit_code = outcome.exit_code
        attempt.duration_s = outcome.duration_s
        attempt.peak_memory_mb = outcome.peak_memory_mb
        attempt.cpu_time_s = outcome.cpu_time_s
        attempt.runs_as = outcome.runs_as
        if outcome.log_tail:
            self._out.changes.logs.append((attempt.id, outcome.log_seq, outcome.log_tail))
        self._end_attempt(attempt, outcome.state, now, reason=outcome.reason)
        return True

    def _end_attempt(self, attempt: AttemptRecord, state: StepState, now: float,
                     reason: str = "", infra: bool = False) -> None:
        attempt.state = state
        attempt.finished_at = now
        attempt.reason = reason
        self._record(attempt)
        self.attempts.pop(attempt.id, None)
        self._unconfirmed.discard(attempt.id)
        step = self.steps[attempt.run_id][attempt.step]
        self._unload(attempt, step, now)
        step.exit_code = attempt.exit_code
        pool = self.pools.get(attempt.pool)
        if infra and pool is not None and pool.spot:
            step.spot_evicted = True  # taken away once: the retry runs on its own pool
        run = self.runs[attempt.run_id]
        kind = "infra" if infra else ("timeout" if state is StepState.TIMED_OUT else "failure")
        ended_badly = state not in (StepState.SUCCEEDED, StepState.CANCELLED)
        spec = step.spec
        again = verdict(kind, step.attempts, step.infra_retries, spec.retry_max, spec.retry_on,
                        spec.retry_infra) if ended_badly and not run.cancel_requested else None
        if again is not None and again.retry:
            transition(step.state, StepState.QUEUED)
            why = again.describe(kind, step.infra_retries, spec.retry_infra)
            step.infra_retries += again.automatic
            step.state = StepState.QUEUED
            step.current_attempt = None
            step.reason = f"attempt {attempt.number} {why}: {reason}".rstrip(": ")
            self._record(step)
            self._release_ready(run.id, [step.name], now)
            return
        final = StepState.CANCELLED if run.cancel_requested and state is not \
            StepState.SUCCEEDED else state
        self._finish_step(step, final, now, reason=reason)
        self._maybe_finish_run(run.id, now)

    def _unload(self, attempt: AttemptRecord, step: StepRecord, now: float) -> None:
        """Free the slot an attempt held on its worker."""
        load = self._load.get(attempt.worker_id)
        if load is not None and attempt.id in load.attempts:
            load.attempts.discard(attempt.id)
            load.cpu -= step.spec.cpu
            load.memory_mb -= step.spec.memory_mb
            if not load.attempts:
                load.idle_since = now

    def _finish_step(self, step: StepRecord, state: StepState, now: float, reason: str) -> None:
        """End a step, release the dependents it was the last need of, and skip the ones it
        can no longer satisfy, and theirs in turn (a worklist: a chain of thousands of needs
        must not exhaust the stack)."""
        todo = [(step, state, reason)]
        marked = {step.name}
        while todo:
            step, state, reason = todo.pop()
            transition(step.state, state)
            step.state = state
            step.finished_at = now
            step.reason = reason
            self._record(step)
            self._open_steps[step.run_id] -= 1
            run_steps = self.steps[step.run_id]
            for name in self._dependents.get((step.run_id, step.name), []):
                dependent = run_steps[name]
                if dependent.state is not StepState.QUEUED:
                    continue
                unmet = self._unmet[(step.run_id, name)]
                if state is StepState.SUCCEEDED:
                    unmet.discard(step.name)
                    if not unmet:
                        self._release_ready(step.run_id, [name], now)
                elif name not in marked:
                    marked.add(name)
                    todo.append((dependent, StepState.SKIPPED,
                                 f"needs {step.name} ({state.value})"))

    def _maybe_finish_run(self, run_id: str, now: float) -> None:
        run = self.runs.get(run_id)
        if run is None or run.state.terminal or self._open_steps[run_id] > 0:
            return
        states = [s.state for s in self.steps[run_id].values()]
        if run.cancel_requested:
            final = RunState.CANCELLED
        elif all(s is StepState.SUCCEEDED for s in states):
            final = RunState.SUCCEEDED
        else:
            final = RunState.FAILED
            bad = [n for n, s in self.steps[run_id].items()
                   if s.state not in (StepState.SUCCEEDED, StepState.SKIPPED)]
            run.reason = "failed steps: " + ", ".join(bad)
        if run.state is RunState.QUEUED and final is not RunState.CANCELLED:
            transition(run.state, RunState.RUNNING)
            run.state = RunState.RUNNING
        transition(run.state, final)
        run.state = final
        run.finished_at = now
        self._record(run)
        self._forget(run_id)

    def _forget(self, run_id: str) -> None:
        """Drop a finished run from memory: the store holds it; the scheduler needs it no more."""
        for name in self.steps.pop(run_id, {}):
            self._unmet.pop((run_id, name), None)
            self._dependents.pop((run_id, name), None)
        self._open_steps.pop(run_id, None)
        self.runs.pop(run_id, None)

    # --- the periodic decision ----------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Notice silent workers, keep pools at size, and place ready steps on free slots."""
        for worker in list(self.workers.values()):
            if (worker.state is WorkerState.READY and worker.last_heartbeat is not None
                    and now - worker.last_heartbeat > self.heartbeat_timeout_s):
                self.worker_lost(worker.id, f"no heartbeat for "
                                 f"{now - worker.last_heartbeat:.0f} s", now)
        self._size_pools(now)
        for pool, heap in self._ready.items():
            if heap:
                self._dispatch_pool(pool, heap, now)

    def _size_pools(self, now: float) -> None:
        """Start and retire workers per pool from its queue (see cicd_ray.sizing)."""
        views = self._worker_views()
        for worker_id in preempt(self.pools, views, now, PREEMPT_AFTER_S):
            self._let_go(self.workers[worker_id], WorkerState.STOPPED,
                         "retired to make room for a higher-priority pool", now)
            for pool_views in views.values():
                pool_views[:] = [v for v in pool_views if v.id != worker_id]
        for pool in self.pools.values():
            sizing = size_pool(pool, views[pool.name], self._queued_cpu(pool.name),
                               self._sizing[pool.name], now)
            for worker_id in sizing.retire:
                self._let_go(self.workers[worker_id], WorkerState.STOPPED,
                             f"retired: {sizing.why}", now)
            for _ in range(sizing.start):
                worker = WorkerRecord(
                    id=f"{pool.name}-{uuid.uuid4().hex[:8]}", pool=pool.name, cpus=pool.cpus,
                    memory_mb=pool.memory_mb, started_at=now, reason=f"started: {sizing.why}",
                )
                self.workers[worker.id] = worker
                self._record(worker)
                self._out.start_workers.append(worker)

    def _dispatch_pool(self, pool: str, heap: list, now: float) -> None:
        workers = [w for w in self.workers.values()
                   if w.pool == pool and w.state is WorkerState.READY]
        if not workers:
            return
        passed_over: list[tuple[int, int, int, str, str]] = []
        while heap and len(passed_over) < BACKFILL_SCAN:
            entry = heapq.heappop(heap)
            _, _, _, run_id, name = entry
            step = self.steps.get(run_id, {}).get(name)
            if step is None or step.state is not StepState.QUEUED:
                continue  # cancelled or skipped while it waited
            worker = self._least_loaded(workers, step.spec)
            if worker is None:
                passed_over.append(entry)
                if not any(self._has_room(w) for w in workers):
                    break
                continue
            self._start_attempt(step, worker, now)
        for entry in passed_over:
            heapq.heappush(heap, entry)

    def _slots_full(self, worker: WorkerRecord) -> bool:
        pool = self.pools.get(worker.pool)
        return bool(pool and pool.slots and len(self._load[worker.id].attempts) >= pool.slots)

    def _has_room(self, worker: WorkerRecord) -> bool:
        return self._load[worker.id].cpu < worker.cpus and not self._slots_full(worker)

    def _least_loaded(self, workers: list[WorkerRecord], spec: PlannedStep) -> WorkerRecord | None:
        best, best_key = None, None
        for w in workers:
            load = self._load[w.id]
            if (load.cpu + spec.cpu > w.cpus + 1e-9 or load.memory_mb + spec.memory_mb > w.memory_mb
                    or self._slots_full(w)):
                continue
            key = (load.cpu / w.cpus, len(load.attempts), w.id)
            if best_key is None or key < best_key:
                best, best_key = w, key
        return best

    def _start_attempt(self, step: StepRecord, worker: WorkerRecord, now: float) -> None:
        run = self.runs[step.run_id]
        transition(step.state, StepState.RUNNING)
        step.state = StepState.RUNNING
        step.attempts += 1
        waited = max(0.0, now - step.queued_at)
        capacity = min(waited, max(0.0, (worker.ready_at or now) - step.queued_at))
        attempt = AttemptRecord(
            id=f"{run.id}/{step.name}/{step.attempts}", run_id=run.id, step=step.name,
            number=step.attempts, worker_id=worker.id, queued_at=step.queued_at, started_at=now,
            wait_capacity_s=round(capacity, 3), wait_slot_s=round(waited - capacity, 3),
            pool=worker.pool,
        )
        step.current_attempt = attempt.id
        step.worker_id = worker.id
        if step.started_at is None:
            step.started_at = now
        self.attempts[attempt.id] = attempt
        load = self._load[worker.id]
        load.cpu += step.spec.cpu
        load.memory_mb += step.spec.memory_mb
        load.attempts.add(attempt.id)
        load.idle_since = None
        if run.state is RunState.QUEUED:
            transition(run.state, RunState.RUNNING)
            run.state = RunState.RUNNING
            run.started_at = now
            self._record(run)
        self._record(step)
        self._record(attempt)
        self._out.dispatch.append((worker.id, StepTask(
            run_id=run.id, attempt_id=attempt.id, attempt=attempt.number, step=step.spec,
            source_digest=run.source_digest, source_git=run.source_git,
        )))

    # --- recovery -----------------------------------------------------------------------------

    def restore(self, runs: list[RunRecord], steps: list[StepRecord],
                workers: list[WorkerRecord], now: float,
                attempts: list[AttemptRecord] = ()) -> None:
        """Rebuild the view from the store after a master restart.

        Workers must register again before they get work. An attempt that was running on a
        worker the store knows stays running, waiting for that worker to register and say
        whether it still runs it or finished it (`reconcile`); one whose worker is unknown is
        ended as an infra failure, so its step is retried where its policy allows it.
        """
        stored = {a.id: a for a in attempts}
        by_run: dict[str, list[StepRecord]] = {}
        for s in steps:
            by_run.setdefault(s.run_id, []).append(s)
        for w in workers:
            if w.state in (WorkerState.STARTING, WorkerState.READY):
                w.last_heartbeat = now  # a fresh grace period: heartbeats stopped with us
                self.workers[w.id] = w
                self._load[w.id] = _Load(idle_since=now)
            else:
                self._gone.add(w.id)
        for run in sorted(runs, key=lambda r: r.seq):
            self._seq = max(self._seq, run.seq)
            run_steps = sorted(by_run.get(run.id, []), key=lambda s: s.spec.index)
            try:
                self._restore_run(run, run_steps, stored, now)
            except Exception as e:  # one run the master cannot take up must not stop it
                self._abandon(run, f"could not be restored after a master restart: "
                                   f"{type(e).__name__}: {e}", now)

    def _restore_run(self, run: RunRecord, run_steps: list[StepRecord],
                     stored: dict[str, AttemptRecord], now: float) -> None:
        self._adopt(run, run_steps)
        done = {s.name for s in run_steps if s.state is StepState.SUCCEEDED}
        for s in run_steps:
            self._unmet[(run.id, s.name)] -= done
        for s in run_steps:
            if s.state is StepState.RUNNING and s.current_attempt:
                self._readopt_attempt(s, now, stored.get(s.current_attempt))
            elif s.state is StepState.QUEUED and not self._unmet[(run.id, s.name)]:
                self._release_ready(run.id, [s.name], now)
        self._maybe_finish_run(run.id, now)

    def _abandon(self, run: RunRecord, reason: str, now: float) -> None:
        """End a run as failed without touching its steps (the scheduler could not follow
        them): it holds no slot, and its running attempts' reports are ignored."""
        for attempt in [a for a in self.attempts.values() if a.run_id == run.id]:
            self.attempts.pop(attempt.id, None)
            self._unconfirmed.discard(attempt.id)
            step = self.steps.get(run.id, {}).get(attempt.step)
            if step is not None:
                self._unload(attempt, step, now)
        self._forget(run.id)
        transition(run.state, RunState.FAILED)
        run.state = RunState.FAILED
        run.finished_at = now
        run.reason = reason[:1000]
        self._record(run)

    def _readopt_attempt(self, step: StepRecord, now: float,
                         stored: AttemptRecord | None) -> None:
        attempt = stored or AttemptRecord(
            id=step.current_attempt or "", run_id=step.run_id, step=step.name,
            number=step.attempts, worker_id=step.worker_id or "", queued_at=step.queued_at,
            started_at=step.started_at or now,
        )
        self.attempts[attempt.id] = attempt
        load = self._load.get(attempt.worker_id)
        if load is None:
            self._end_attempt(attempt, StepState.FAILED, now, infra=True,
                              reason="its worker was gone when the master restarted")
            return
        load.cpu += step.spec.cpu
        load.memory_mb += step.spec.memory_mb
        load.attempts.add(attempt.id)
        load.idle_since = None
        self._unconfirmed.add(attempt.id)

    def reconcile(self, worker_id: str, running: list[str], finished: list[StepOutcome],
                  now: float) -> None:
        """A worker registered (again) and said what it runs and what it finished: apply the
        results the master missed, and end as lost the attempts it no longer knows."""
        for outcome in finished:
            self.on_outcome(outcome, now)
        load = self._load.get(worker_id)
        for attempt_id in sorted(load.attempts if load else ()):
            if attempt_id in self._unconfirmed and attempt_id not in running:
                attempt = self.attempts.get(attempt_id)
                if attempt is not None:
                    self._end_attempt(attempt, StepState.FAILED, now, infra=True,
                                      reason=f"worker {worker_id} no longer ran it after the "
                                             "master restarted")
        self._unconfirmed -= set(load.attempts if load else ()) | set(running)

    # --- look-ahead ---------------------------------------------------------------------------

    def lookahead(self) -> dict[str, int]:
        """Per pool, the workers it will need once the steps whose needs are all running now
        become ready (with what runs and waits already); only pools where that is more than
        they have. The master asks the autoscaler for that capacity ahead of time. Nothing
        when look-ahead is off."""
        if not self.lookahead_on:
            return {}
        upcoming: dict[str, list[float]] = {}
        seen: set[tuple[str, str]] = set()
        for attempt in self.attempts.values():
            for name in self._dependents.get((attempt.run_id, attempt.step), ()):
                key = (attempt.run_id, name)
                step = self.steps.get(attempt.run_id, {}).get(name)
                if key in seen or step is None or step.state is not StepState.QUEUED:
                    continue
                seen.add(key)
                run_steps = self.steps[attempt.run_id]
                if all(run_steps[n].state is StepState.RUNNING for n in self._unmet[key]):
                    upcoming.setdefault(step.spec.pool, []).append(step.spec.cpu)
        out: dict[str, int] = {}
        views = self._worker_views()
        for name, cpus in upcoming.items():
            future = workers_needed(self.pools[name], views[name], self._queued_cpu(name) + cpus)
            if future > len(views[name]):
                out[name] = future
        return out

    def _worker_views(self) -> dict[str, list[WorkerView]]:
        """The live workers of each pool, as the sizer sees them."""
        views: dict[str, list[WorkerView]] = {name: [] for name in self.pools}
        for w in self.workers.values():
            if w.pool in views and w.state in (WorkerState.STARTING, WorkerState.READY):
                load = self._load.get(w.id, _Load())
                views[w.pool].append(WorkerView(
                    id=w.id, ready=w.state is WorkerState.READY, started_at=w.started_at,
                    busy_cpu=load.cpu, busy_steps=len(load.attempts),
                    idle_since=load.idle_since if not load.attempts else None))
        return views

    def _queued_cpu(self, pool: str) -> list[float]:
        """The CPUs of each step ready and waiting in the pool."""
        return [self.steps[e[3]][e[4]].spec.cpu for e in self._ready.get(pool, ())
                if self._is_queued(e)]

    # --- views --------------------------------------------------------------------------------

    def worker_load(self, worker_id: str) -> tuple[float, list[str]]:
        """CPUs in use and the attempts running on a worker (kept in memory, not stored)."""
        load = self._load.get(worker_id, _Load())
        return load.cpu, sorted(load.attempts)

    def queue_view(self, now: float) -> dict[str, dict]:
        """Per pool: steps ready and waiting for a slot, and how long the oldest has waited."""
        out: dict[str, dict] = {name: {"queued": 0, "oldest_wait_s": 0.0} for name in self.pools}
        for pool, heap in self._ready.items():
            waits = [now - self.steps[e[3]][e[4]].queued_at for e in heap if self._is_queued(e)]
            out[pool] = {"queued": len(waits), "oldest_wait_s": round(max(waits, default=0.0), 3)}
        return out

    def _is_queued(self, entry: tuple[int, int, int, str, str]) -> bool:
        step = self.steps.get(entry[3], {}).get(entry[4])
        return step is not None and step.state is StepState.QUEUED
