"""Attempts: a step started on a worker's slot, ended by its report (once), by its worker's
loss or by a kill, and then retried where the retry rule says so or finished.
"""

from __future__ import annotations

from cicd_ray.pools import PoolConfig
from cicd_ray.protocol import StepOutcome, StepTask
from cicd_ray.records import AttemptRecord, Origin, ResultRecord, StepRecord, WorkerRecord
from cicd_ray.scheduler.advance import Advance
from cicd_ray.scheduler.builds import inputs_of
from cicd_ray.scheduler.decisions import Decisions, Kill
from cicd_ray.scheduler.queues import ReadyQueues
from cicd_ray.scheduler.retries import Cause, Verdict, verdict
from cicd_ray.scheduler.runbook import RunBook
from cicd_ray.scheduler.slots import Slots
from cicd_ray.states import StepState, move


class Attempts:
    """The running attempts, by id, and what starts, stops and ends them."""

    def __init__(
        self,
        pools: dict[str, PoolConfig],
        book: RunBook,
        slots: Slots,
        queues: ReadyQueues,
        advance: Advance,
        out: Decisions,
        artifact_run_max_bytes: int,
    ) -> None:
        self.pools = pools
        self.book = book
        self.slots = slots
        self.queues = queues
        self.advance = advance
        self.out = out
        self.artifact_run_max_bytes = artifact_run_max_bytes
        self.running: dict[str, AttemptRecord] = {}
        # Attempts killed by a cancel (they end cancelled), with the reason to end them with
        # ("": the worker's).
        self.stopping: dict[str, str] = {}

    def start(self, step: StepRecord, worker: WorkerRecord, now: float) -> None:
        """Start the step's next attempt on a slot of `worker`, and dispatch it."""
        run = self.book.runs[step.run_id]
        move(step, StepState.RUNNING)
        step.attempts += 1
        attempt = new_attempt(step, worker, now)
        step.current_attempt = attempt.id
        step.worker_id = worker.id
        step.started_at = step.started_at or now
        self.running[attempt.id] = attempt
        self.slots.reserve(worker.id, attempt.id, step.spec)
        self.book.start(run, now)
        self.out.record(step)
        self.out.record(attempt)
        run_steps = self.book.steps[run.id]
        room = self.artifact_run_max_bytes
        if step.spec.artifacts:  # what the run kept so far, counted only where it matters
            room -= sum(f.size for s in run_steps.values() for f in s.artifacts)
        task = StepTask(
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
        )
        self.out.dispatch.append((worker.id, task))

    def on_outcome(self, outcome: StepOutcome, now: float) -> bool:
        """Apply a worker's report once. A stale or duplicate report is ignored (False)."""
        attempt = self.running.get(outcome.attempt_id)
        if attempt is None or attempt.state is not StepState.RUNNING:
            return False
        measure(attempt, outcome)
        if outcome.log_tail:
            self.out.changes.logs.append((attempt.id, outcome.log_seq, outcome.log_tail))
        self.end(attempt, outcome.state, now, reason=outcome.reason)
        return True

    def stop(self, step: StepRecord, reason: str = "") -> None:
        """Kill the step's attempt; it ends cancelled, with `reason` if one is given."""
        if step.current_attempt:
            self.stopping[step.current_attempt] = reason
            self.out.kill.append(Kill(step.current_attempt, step.worker_id or ""))

    def lost(self, attempt_ids: list[str], reason: str, now: float) -> None:
        """These attempts' worker is gone: each ends as an infra failure (retried if allowed)."""
        for attempt_id in attempt_ids:
            attempt = self.running.get(attempt_id)
            if attempt is not None:
                self.end(attempt, StepState.FAILED, now, reason=reason, infra=True)

    def end(
        self,
        attempt: AttemptRecord,
        state: StepState,
        now: float,
        reason: str = "",
        infra: bool = False,
    ) -> None:
        """End an attempt: its slot freed, its result kept for reuse, then its step retried
        (the retry rule) or finished."""
        move(attempt, state)
        attempt.finished_at = now
        attempt.reason = reason
        self.out.record(attempt)
        self.running.pop(attempt.id, None)
        step = self.book.steps[attempt.run_id][attempt.step]
        self.slots.release(attempt.worker_id, attempt.id, step.spec, now)
        step.exit_code = attempt.exit_code
        step.artifacts = attempt.artifacts
        if state is StepState.SUCCEEDED and step.spec.reuse and step.key:
            self.out.changes.results[step.key] = ResultRecord(
                key=step.key,
                origin=Origin(run_id=step.run_id, step=step.name, attempt=attempt.number),
                artifacts=attempt.artifacts,
                at=now,
            )
        pool = self.pools.get(attempt.pool)
        if infra and pool is not None and pool.spot:
            step.spot_evicted = True  # taken away once: the retry runs on its own pool
        run = self.book.runs[attempt.run_id]
        stopped = attempt.id in self.stopping  # killed by a cancel
        reason = self.stopping.pop(attempt.id, "") or reason
        failed = state not in (StepState.SUCCEEDED, StepState.CANCELLED)
        if failed and not stopped and not run.cancel_requested:
            cause: Cause = (
                "infra" if infra else ("timeout" if state is StepState.TIMED_OUT else "failure")
            )
            again = verdict(step.spec, cause, step.attempts, step.infra_retries)
            if again.retry:
                self._requeue(step, attempt, again, reason, now)
                return
        final = StepState.CANCELLED if stopped and state is not StepState.SUCCEEDED else state
        self.advance.finish(step, final, now, reason=reason)
        self.book.finish_run_if_done(run.id, now)

    def _requeue(
        self, step: StepRecord, attempt: AttemptRecord, again: Verdict, reason: str, now: float
    ) -> None:
        move(step, StepState.QUEUED)
        step.infra_retries += again.automatic
        step.current_attempt = None
        step.reason = f"attempt {attempt.number} {again.why}: {reason}".rstrip(": ")
        self.out.record(step)
        self.queues.push(self.book.runs[step.run_id], step, now)


def measure(attempt: AttemptRecord, outcome: StepOutcome) -> None:
    """The attempt takes what its worker measured of it."""
    attempt.exit_code = outcome.exit_code
    attempt.duration_s = outcome.duration_s
    attempt.peak_memory_mb = outcome.peak_memory_mb
    attempt.cpu_time_s = outcome.cpu_time_s
    attempt.runs_as = outcome.runs_as
    attempt.artifacts = outcome.artifacts
    attempt.caches = outcome.caches


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
