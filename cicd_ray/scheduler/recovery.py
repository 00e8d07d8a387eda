"""The scheduler's recovery: taking up runs, attempts and workers from the store after a master
restart, and reconciling what a worker says when it registers again.
"""

from __future__ import annotations

from cicd_ray.protocol import StepOutcome
from cicd_ray.records import AttemptRecord, RunRecord, StepRecord, WorkerRecord
from cicd_ray.scheduler.advance import Advance
from cicd_ray.scheduler.attempts import Attempts
from cicd_ray.scheduler.flow import Flow
from cicd_ray.scheduler.runbook import RunBook
from cicd_ray.scheduler.slots import Slots
from cicd_ray.states import StepState


class Recovery:
    """What a restarted master takes up from the store, and what a returning worker says."""

    def __init__(
        self, book: RunBook, slots: Slots, flow: Flow, advance: Advance, attempts: Attempts
    ) -> None:
        self.book = book
        self.slots = slots
        self.flow = flow
        self.advance = advance
        self.attempts = attempts

    def restore(
        self,
        runs: list[RunRecord],
        steps: list[StepRecord],
        workers: list[WorkerRecord],
        now: float,
        attempts: list[AttemptRecord] = (),
    ) -> int:
        """Rebuild the view from the store after a master restart; the highest run sequence.

        Workers must register again before they get work. An attempt that was running on a
        worker the store knows stays running, waiting for that worker to register and say
        whether it still runs it or finished it (`reconcile`); one whose worker is unknown is
        ended as an infra failure, so its step is retried where its policy allows it.
        """
        stored = {a.id: a for a in attempts}
        by_run: dict[str, list[StepRecord]] = {}
        for s in steps:
            by_run.setdefault(s.run_id, []).append(s)
        self.slots.restore(workers, now)
        self.flow.restore_places(runs, steps)
        seq = 0
        for run in sorted(runs, key=lambda r: r.seq):
            seq = max(seq, run.seq)
            run_steps = sorted(by_run.get(run.id, []), key=lambda s: s.spec.index)
            try:
                self._restore_run(run, run_steps, stored, now)
            except Exception as e:  # one run the master cannot take up must not stop it
                self._abandon(
                    run,
                    f"could not be restored after a master restart: {type(e).__name__}: {e}",
                    now,
                )
        return seq

    def _restore_run(
        self,
        run: RunRecord,
        run_steps: list[StepRecord],
        stored: dict[str, AttemptRecord],
        now: float,
    ) -> None:
        self.book.adopt(run, run_steps)
        if not self.flow.admit_run(run, fresh=False, now=now):
            return  # waits its turn in its concurrency group, in the order stored
        for s in run_steps:
            if s.state is StepState.RUNNING and s.current_attempt:
                self._readopt_attempt(s, now, stored.get(s.current_attempt))
            elif s.state is StepState.WAITING_APPROVAL:
                self.flow.resume_approval(run, s, now)
            elif s.state is StepState.QUEUED and not self.book.unmet(run.id, s.name):
                self.advance.ready(run, [s], now)
        self.book.finish_run_if_done(run.id, now)

    def _readopt_attempt(self, step: StepRecord, now: float, stored: AttemptRecord | None) -> None:
        attempt = stored or AttemptRecord(
            id=step.current_attempt or "",
            run_id=step.run_id,
            step=step.name,
            number=step.attempts,
            worker_id=step.worker_id or "",
            queued_at=step.queued_at,
            started_at=step.started_at or now,
        )
        self.attempts.running[attempt.id] = attempt
        if not self.slots.reserve(attempt.worker_id, attempt.id, step.spec):
            reason = "its worker was gone when the master restarted"
            self.attempts.end(attempt, StepState.FAILED, now, infra=True, reason=reason)
            return
        self.slots.unconfirmed(attempt.id)

    def _abandon(self, run: RunRecord, reason: str, now: float) -> None:
        """End a run as failed without touching its steps (the scheduler could not follow
        them): it holds no slot, and its running attempts' reports are ignored."""
        running = self.attempts.running
        for attempt in [a for a in running.values() if a.run_id == run.id]:
            del running[attempt.id]
            step = self.book.step(run.id, attempt.step)
            if step is not None:
                self.slots.release(attempt.worker_id, attempt.id, step.spec, now)
        self.book.abandon(run, reason, now)

    def reconcile(
        self, worker_id: str, running: list[str], finished: list[StepOutcome], now: float
    ) -> None:
        """A worker registered (again) and said what it runs and what it finished: apply the
        results the master missed, and end as lost the attempts it no longer knows."""
        for outcome in finished:
            self.attempts.on_outcome(outcome, now)
        gone = self.slots.unconfirmed_on(worker_id, running)
        reason = f"worker {worker_id} no longer ran it after the master restarted"
        self.attempts.lost(gone, reason, now)
