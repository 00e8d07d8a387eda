"""The scheduler's run control: what people and concurrency groups ask of runs — cancel a run,
replace an older member of a group, answer an approval — and, each tick, taking up the
members a group let in and the approvals whose time ran out.
"""

from __future__ import annotations

from cicd_ray.records import RunRecord
from cicd_ray.scheduler.advance import Advance
from cicd_ray.scheduler.attempts import Attempts
from cicd_ray.scheduler.decisions import Decisions
from cicd_ray.scheduler.flow import TIMEOUT_BY, Flow
from cicd_ray.scheduler.runbook import RunBook
from cicd_ray.states import StepState, move


class Control:
    """Requests about runs, from people (cancel, approve) and from concurrency groups."""

    def __init__(
        self, book: RunBook, flow: Flow, advance: Advance, attempts: Attempts, out: Decisions
    ) -> None:
        self.book = book
        self.flow = flow
        self.advance = advance
        self.attempts = attempts
        self.out = out

    def cancel(
        self, run_id: str, now: float, reason: str = "cancelled by request", spare: bool = False
    ) -> RunRecord | None:
        """Cancel a run: its queued and waiting steps at once (but those whose `if:` still
        holds, such as `always()`), its running steps once their worker kills them (`spare`:
        not those marked `interruptible: false`)."""
        run = self.book.runs.get(run_id)
        if run is None or run.state.terminal or run.cancel_requested:
            return run
        run.cancel_requested = True
        run.reason = reason
        self.out.record(run)
        for step in list(self.book.steps[run_id].values()):
            if step.state is StepState.WAITING_APPROVAL or (
                step.state is StepState.QUEUED and not self.flow.still_wanted(step)
            ):
                self.advance.finish(step, StepState.CANCELLED, now, reason="run cancelled")
            elif step.state is StepState.RUNNING and not (spare and step.spec.let_finish):
                self.attempts.stop(step)
        self.book.finish_run_if_done(run_id, now)
        return run

    def replace(self, member: str, reason: str, now: float) -> None:
        """A newer member of a concurrency group with cancel_in_progress replaces this one."""
        run_id, _, name = member.partition("/")
        if not name:
            self.cancel(run_id, now, reason=reason, spare=True)
            return
        step = self.book.step(run_id, name)
        if step is None or step.state.terminal:
            return
        if step.state is StepState.RUNNING:
            if not step.spec.let_finish:
                self.attempts.stop(step, reason)
            return
        self.advance.finish(step, StepState.CANCELLED, now, reason=reason)
        self.book.finish_run_if_done(run_id, now)

    def approve(
        self, run_id: str, name: str, approved: bool, by: str, comment: str, now: float
    ) -> str | None:
        """Answer a step waiting for approval; a problem (as text) when it is not waiting."""
        step = self.book.step(run_id, name)
        if step is None or step.state is not StepState.WAITING_APPROVAL:
            state = step.state.value if step else "not active"
            return f"step {name} of run {run_id} is not waiting for approval (it is {state})"
        state, why = self.flow.answer(step, approved, by, comment, now)
        if state is StepState.QUEUED:
            move(step, StepState.QUEUED)
            step.reason = why
            self.out.record(step)
            self.advance.ready(self.book.runs[run_id], [step], now)
        else:
            self.advance.finish(step, state, now, reason=why)
            self.book.finish_run_if_done(run_id, now)
        return None

    def tick(self, now: float) -> None:
        """End the approvals whose time ran out; take up what the groups let in."""
        for run_id, name in self.flow.overdue(now):
            step = self.book.step(run_id, name)
            timeout = f"no answer within {step.spec.timeout_s:g} s" if step else ""
            self.approve(run_id, name, False, TIMEOUT_BY, timeout, now)
        for member in self.flow.take_admitted():
            run_id, _, name = member.partition("/")
            run = self.book.runs.get(run_id)
            if run is None or run.state.terminal:
                continue
            if not name:
                run.admitted, run.reason = True, ""
                self.out.record(run)
                self.advance.start_run(run, now)
                continue
            step = self.book.step(run_id, name)
            if step is not None and step.state is StepState.QUEUED:
                step.admitted, step.reason = True, ""
                self.advance.ready(run, [step], now)
        self.flow.refresh()
