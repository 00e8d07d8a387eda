"""`Scheduler`: the policy's one entry point, a facade over the runs' DAG state, the ready
queues and the slots. Each method changes the view and collects what must happen in a
`Decisions` batch; the master takes it with `take()`, writes its records, and only then
dispatches, kills, starts or stops anything.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from cicd_ray.pipeline.model import PlannedStep
from cicd_ray.pools import PoolConfig
from cicd_ray.records import (
    AttemptRecord,
    Origin,
    ResultRecord,
    RunRecord,
    StepOutcome,
    StepRecord,
    StepTask,
    WorkerRecord,
)
from cicd_ray.scheduler.builds import carry, inputs_of, reused
from cicd_ray.scheduler.control import Control
from cicd_ray.scheduler.decisions import Decisions
from cicd_ray.scheduler.flow import Flow
from cicd_ray.scheduler.lookahead import upcoming, workers_wanted
from cicd_ray.scheduler.queues import ReadyQueues
from cicd_ray.scheduler.recovery import Recovery
from cicd_ray.scheduler.retries import Cause, Verdict, verdict
from cicd_ray.scheduler.reuse import key_of, key_parts
from cicd_ray.scheduler.runbook import RunBook
from cicd_ray.scheduler.share import Share
from cicd_ray.scheduler.slots import Slots
from cicd_ray.states import StepState, WorkerState, move


class Scheduler(Control, Recovery):
    def __init__(
        self,
        pools: dict[str, PoolConfig],
        heartbeat_timeout_s: float = 15.0,
        lookahead: bool = True,
        artifact_run_max_bytes: int = 20 * 1024**3,
        results: Callable[[str], ResultRecord | None] = lambda key: None,
        share: Share | None = None,
    ) -> None:
        self.pools = pools
        self.results = results  # the stored success of a step key, if any (step reuse)
        self.lookahead_on = lookahead  # CICD_RAY_LOOKAHEAD
        self.artifact_run_max_bytes = artifact_run_max_bytes
        self._out = Decisions()
        self.book = RunBook(self._out, ended=lambda record: self.flow.ended(record))
        self.flow = Flow(self.book, self._out, self._replace)
        self.queues = ReadyQueues(pools, self.book.step, share)
        self.slots = Slots(pools, heartbeat_timeout_s, self._out)
        self.attempts: dict[str, AttemptRecord] = {}  # running, by id
        # Attempts killed by a cancel (they end cancelled), with the reason to end them with
        # ("": the worker's).
        self._stopping: dict[str, str] = {}
        self._seq = 0

    @property
    def runs(self) -> dict[str, RunRecord]:
        return self.book.runs

    @property
    def steps(self) -> dict[str, dict[str, StepRecord]]:
        return self.book.steps

    @property
    def workers(self) -> dict[str, WorkerRecord]:
        return self.slots.workers

    def take(self) -> Decisions:
        return self._out.drain()

    # --- runs -------------------------------------------------------------------------------

    def submit(
        self,
        run: RunRecord,
        planned: list[PlannedStep],
        now: float,
        carried: dict[str, StepRecord] | None = None,
    ) -> None:
        """Accept a new run (the caller has checked `check_fits`). `carried`: successes of an
        earlier run (by step name) taken over as they are, with their artifacts (a re-run of
        the failed part)."""
        self._seq = max(self._seq, run.seq) + 1
        run.seq = self._seq
        steps = [
            carry(carried[p.name], run.id, now)
            if carried and p.name in carried
            else StepRecord(run_id=run.id, spec=p, queued_at=now, project=run.project)
            for p in planned
        ]
        self.book.adopt(run, steps)
        self._out.record(run)
        for s in steps:
            self._out.record(s)
        if self.flow.admit_run(run, fresh=True, now=now):
            self._start_run(run, now)
        self.book.finish_run_if_done(run.id, now)  # every step carried over

    def _start_run(self, run: RunRecord, now: float) -> None:
        """Take up the steps of a run (admitted by its concurrency group) whose needs ended."""
        self._ready(
            run,
            [
                s
                for s in self.steps[run.id].values()
                if s.state is StepState.QUEUED and not self.book.unmet(run.id, s.name)
            ],
            now,
        )

    def _finish(self, step: StepRecord, state: StepState, now: float, reason: str) -> None:
        run = self.runs[step.run_id]
        self._ready(run, self.book.finish_step(step, state, now, reason), now)

    def _ready(self, run: RunRecord, ready: list[StepRecord], now: float) -> None:
        """Steps whose needs have ended: each passes its condition, approval and concurrency
        group (`Flow.gate`), then gets its key; one that may reuse a stored success with that
        key takes it (and its dependents come next), the others are queued. A worklist: a
        chain of reused or skipped steps must not exhaust the stack."""
        todo = deque(ready)
        ended = False
        while todo:
            step = todo.popleft()
            if step.state is not StepState.QUEUED:
                continue  # ended meanwhile (a group's newer member replaced it)
            gate = self.flow.gate(run, step, now)
            if gate.skip is not None:
                todo.extend(self.book.finish_step(step, gate.skip, now, gate.reason))
                ended = True
                continue
            if not gate.go:
                continue
            step.key_parts = key_parts(step.spec, run, inputs_of(step, self.steps[run.id]))
            step.key = key_of(step.key_parts)
            self._out.record(step)
            found = self.results(step.key) if step.spec.reuse else None
            if found is None:
                self.queues.push(run, step, now)
            else:
                todo.extend(self._reuse(run, step, found, now))
                ended = True
        if ended:
            self.book.finish_run_if_done(run.id, now)

    def _reuse(
        self, run: RunRecord, step: StepRecord, found: ResultRecord, now: float
    ) -> list[StepRecord]:
        """End a step as the success it reuses, with an attempt that ran nothing; returns the
        dependents it made ready."""
        move(step, StepState.RUNNING)
        attempt, note = reused(step, found, now)
        self.book.start(run, now)
        self._out.record(attempt)
        self._out.changes.logs.append((attempt.id, 1, note.encode()))
        o = found.origin
        reason = f"reused from run {o.run_id} ({o.step}, attempt {o.attempt})"
        return self.book.finish_step(step, StepState.SUCCEEDED, now, reason)

    # --- workers ----------------------------------------------------------------------------

    def register_worker(self, worker: WorkerRecord, now: float) -> None:
        self.slots.register(worker, now)

    def heartbeat(self, worker_id: str, usage: dict[str, float], now: float) -> bool:
        """Note a heartbeat; False when the worker is not (or no longer) known as ready."""
        return self.slots.heartbeat(worker_id, usage, now)

    def worker_lost(self, worker_id: str, reason: str, now: float) -> None:
        """The worker died or went silent: its steps are retried as infra failures or fail."""
        if worker_id not in self.workers:  # unknown, or already let go
            return
        for attempt_id in self.slots.let_go(worker_id, WorkerState.LOST, f"lost: {reason}", now):
            attempt = self.attempts.get(attempt_id)
            if attempt is not None:
                self._end_attempt(
                    attempt,
                    StepState.FAILED,
                    now,
                    infra=True,
                    reason=f"worker {worker_id} lost: {reason}",
                )

    # --- attempts ---------------------------------------------------------------------------

    def on_outcome(self, outcome: StepOutcome, now: float) -> bool:
        """Apply a worker's report once. A stale or duplicate report is ignored (False)."""
        attempt = self.attempts.get(outcome.attempt_id)
        if attempt is None or attempt.state is not StepState.RUNNING:
            return False
        attempt.measured(outcome)
        if outcome.log_tail:
            self._out.changes.logs.append((attempt.id, outcome.log_seq, outcome.log_tail))
        self._end_attempt(attempt, outcome.state, now, reason=outcome.reason)
        return True

    def _start_attempt(self, step: StepRecord, worker: WorkerRecord, now: float) -> None:
        run = self.runs[step.run_id]
        move(step, StepState.RUNNING)
        step.attempts += 1
        attempt = new_attempt(step, worker, now)
        step.current_attempt = attempt.id
        step.worker_id = worker.id
        step.started_at = step.started_at or now
        self.attempts[attempt.id] = attempt
        self.slots.reserve(worker.id, attempt.id, step.spec)
        self.book.start(run, now)
        self._out.record(step)
        self._out.record(attempt)
        run_steps = self.steps[run.id]
        room = self.artifact_run_max_bytes
        if step.spec.artifacts:  # what the run kept so far, counted only where it matters
            room -= sum(f.size for s in run_steps.values() for f in s.artifacts)
        self._out.dispatch.append(
            (
                worker.id,
                StepTask(
                    run_id=run.id,
                    attempt_id=attempt.id,
                    attempt=attempt.number,
                    step=step.spec,
                    source_digest=run.source_digest,
                    source_git=run.source_git,
                    commit=run.commit,
                    pipeline=run.pipeline,
                    project=run.project,
                    branch=run.branch,
                    event=run.event,
                    pr=run.pr,
                    fork=run.fork,
                    inputs=inputs_of(step, run_steps),
                    artifact_room_bytes=max(0, room),
                ),
            )
        )

    def _end_attempt(
        self,
        attempt: AttemptRecord,
        state: StepState,
        now: float,
        reason: str = "",
        infra: bool = False,
    ) -> None:
        move(attempt, state)
        attempt.finished_at = now
        attempt.reason = reason
        self._out.record(attempt)
        self.attempts.pop(attempt.id, None)
        step = self.steps[attempt.run_id][attempt.step]
        self.slots.release(attempt.worker_id, attempt.id, step.spec, now)
        step.exit_code = attempt.exit_code
        step.artifacts = attempt.artifacts
        if state is StepState.SUCCEEDED and step.spec.reuse and step.key:
            self._out.changes.results[step.key] = ResultRecord(
                key=step.key,
                origin=Origin(run_id=step.run_id, step=step.name, attempt=attempt.number),
                artifacts=attempt.artifacts,
                at=now,
            )
        pool = self.pools.get(attempt.pool)
        if infra and pool is not None and pool.spot:
            step.spot_evicted = True  # taken away once: the retry runs on its own pool
        run = self.runs[attempt.run_id]
        stopped = attempt.id in self._stopping  # killed by a cancel
        reason = self._stopping.pop(attempt.id, "") or reason
        if (
            state not in (StepState.SUCCEEDED, StepState.CANCELLED)
            and not stopped
            and not run.cancel_requested
        ):
            cause: Cause = (
                "infra" if infra else ("timeout" if state is StepState.TIMED_OUT else "failure")
            )
            again = verdict(step.spec, cause, step.attempts, step.infra_retries)
            if again.retry:
                self._requeue(step, attempt, again, reason, now)
                return
        final = StepState.CANCELLED if stopped and state is not StepState.SUCCEEDED else state
        self._finish(step, final, now, reason=reason)
        self.book.finish_run_if_done(run.id, now)

    def _requeue(
        self, step: StepRecord, attempt: AttemptRecord, again: Verdict, reason: str, now: float
    ) -> None:
        move(step, StepState.QUEUED)
        step.infra_retries += again.automatic
        step.current_attempt = None
        step.reason = f"attempt {attempt.number} {again.why}: {reason}".rstrip(": ")
        self._out.record(step)
        self.queues.push(self.runs[step.run_id], step, now)

    # --- the periodic decision ----------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Take up what concurrency groups let in and the approvals that ran out, notice silent
        workers, keep pools at size, and place ready steps on free slots."""
        self._flow_tick(now)
        for worker_id, silent_s in self.slots.silent(now):
            self.worker_lost(worker_id, f"no heartbeat for {silent_s:.0f} s", now)
        self.slots.size(self._queued_cpu(), now)
        self.queues.share.running = Counter(
            self.runs[a.run_id].project for a in self.attempts.values()
        )
        for pool in self.queues.nonempty():
            workers = self.slots.ready_in(pool)
            if not workers:
                continue
            for step, worker in self.queues.placements(
                pool,
                lambda s, ws=workers: self.slots.least_loaded(ws, s.spec),
                lambda ws=workers: self.slots.any_room(ws),
            ):
                self._start_attempt(step, worker, now)

    def _queued_cpu(self) -> dict[str, list[float]]:
        """Per pool, the CPUs of each step ready and waiting in it."""
        return {pool: [s.spec.cpu for s in self.queues.waiting(pool)] for pool in self.pools}

    # --- look-ahead and views -----------------------------------------------------------------

    def lookahead(self) -> dict[str, int]:
        """Per pool, the workers its coming steps will need, where more than it has (see
        `cicd_ray.scheduler.lookahead`); nothing when look-ahead is off."""
        if not self.lookahead_on:
            return {}
        coming = upcoming(self.book, self.attempts.values())
        return workers_wanted(self.pools, coming, self.slots.views(), self._queued_cpu())

    def worker_load(self, worker_id: str) -> tuple[float, list[str]]:
        """CPUs in use and the attempts running on a worker (kept in memory, not stored)."""
        return self.slots.load_of(worker_id)

    def queue_view(self, now: float) -> dict[str, dict]:
        return self.queues.view(now)


def new_attempt(step: StepRecord, worker: WorkerRecord, now: float) -> AttemptRecord:
    """The record of the step's next attempt, starting now on `worker`, with where its wait
    went: for a worker or node to come up (it was not ready when the step was queued), and for
    a free slot (the rest)."""
    waited = max(0.0, now - step.queued_at)
    capacity = min(waited, max(0.0, (worker.ready_at or now) - step.queued_at))
    return AttemptRecord(
        id=f"{step.run_id}/{step.name}/{step.attempts}",
        run_id=step.run_id,
        step=step.name,
        number=step.attempts,
        worker_id=worker.id,
        queued_at=step.queued_at,
        started_at=now,
        wait_capacity_s=round(capacity, 3),
        wait_slot_s=round(waited - capacity, 3),
        pool=worker.pool,
    )
