"""Advancing a run: what happens to the steps whose needs have ended. Each passes its condition,
approval and concurrency group (`Flow.gate`), then gets its key; one that may reuse a stored
success with that key takes it (and its dependents come next), the others are queued.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from cicd_ray.records import ResultRecord, RunRecord, StepRecord
from cicd_ray.scheduler.builds import inputs_of, reused
from cicd_ray.scheduler.decisions import Decisions
from cicd_ray.scheduler.flow import Flow
from cicd_ray.scheduler.queues import ReadyQueues
from cicd_ray.scheduler.reuse import key_of, key_parts
from cicd_ray.scheduler.runbook import RunBook
from cicd_ray.states import StepState, move


class Advance:
    """Moves runs forward from ended steps to the next ready ones, for the scheduler and its
    parts (control, attempts, recovery), which all end steps through it."""

    def __init__(
        self,
        book: RunBook,
        flow: Flow,
        queues: ReadyQueues,
        out: Decisions,
        results: Callable[[str], ResultRecord | None],
    ) -> None:
        self.book = book
        self.flow = flow
        self.queues = queues
        self.out = out
        self.results = results  # the stored success of a step key, if any (step reuse)

    def start_run(self, run: RunRecord, now: float) -> None:
        """Take up the steps of a run (admitted by its concurrency group) whose needs ended."""
        steps = self.book.steps[run.id].values()
        ready = [
            s for s in steps if s.state is StepState.QUEUED and not self.book.unmet(run.id, s.name)
        ]
        self.ready(run, ready, now)

    def finish(self, step: StepRecord, state: StepState, now: float, reason: str) -> None:
        """End a step, and take up the steps that were waiting for it."""
        run = self.book.runs[step.run_id]
        self.ready(run, self.book.finish_step(step, state, now, reason), now)

    def ready(self, run: RunRecord, ready: list[StepRecord], now: float) -> None:
        """Steps whose needs have ended, through their gates to the queue or to reuse. A
        worklist: a chain of reused or skipped steps must not exhaust the stack."""
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
            step.key_parts = key_parts(step.spec, run, inputs_of(step, self.book.steps[run.id]))
            step.key = key_of(step.key_parts)
            self.out.record(step)
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
        self.out.record(attempt)
        self.out.changes.logs.append((attempt.id, 1, note.encode()))
        o = found.origin
        reason = f"reused from run {o.run_id} ({o.step}, attempt {o.attempt})"
        return self.book.finish_step(step, StepState.SUCCEEDED, now, reason)
