"""The scheduler's run control: what people and concurrency groups ask of runs — cancel a run,
replace an older member of a group, answer an approval — and, each tick, taking up the
members a group let in and the approvals whose time ran out.

A part of `Scheduler` (a mixin: it works on the facade's run book, flow and decisions, and
finishes steps with its `_finish` and `_ready`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cicd_ray.records import RunRecord, StepRecord
from cicd_ray.scheduler.decisions import Decisions, Kill
from cicd_ray.scheduler.flow import TIMEOUT_BY
from cicd_ray.states import StepState, move

if TYPE_CHECKING:
    from cicd_ray.scheduler.flow import Flow
    from cicd_ray.scheduler.runbook import RunBook


class Control:
    # What it works on, the facade's (with its `runs`, `steps`, `_finish` and `_ready`).
    book: RunBook
    flow: Flow
    _out: Decisions
    _stopping: dict[str, str]

    def cancel(
        self, run_id: str, now: float, reason: str = "cancelled by request", spare: bool = False
    ) -> RunRecord | None:
        """Cancel a run: its queued and waiting steps at once (but those whose `if:` still
        holds, such as `always()`), its running steps once their worker kills them (`spare`:
        not those marked `interruptible: false`)."""
        run = self.runs.get(run_id)
        if run is None or run.state.terminal or run.cancel_requested:
            return run
        run.cancel_requested = True
        run.reason = reason
        self._out.record(run)
        for step in list(self.steps[run_id].values()):
            if step.state is StepState.WAITING_APPROVAL or (
                step.state is StepState.QUEUED and not self.flow.still_wanted(step)
            ):
                self._finish(step, StepState.CANCELLED, now, reason="run cancelled")
            elif step.state is StepState.RUNNING and not (spare and step.spec.let_finish):
                self._stop(step)
        self.book.finish_run_if_done(run_id, now)
        return run

    def _stop(self, step: StepRecord, reason: str = "") -> None:
        """Kill the step's attempt; it ends cancelled, with `reason` if one is given."""
        if step.current_attempt:
            self._stopping[step.current_attempt] = reason
            self._out.kill.append(Kill(step.current_attempt, step.worker_id or ""))

    def _replace(self, member: str, reason: str, now: float) -> None:
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
                self._stop(step, reason)
            return
        self._finish(step, StepState.CANCELLED, now, reason=reason)
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
            self._out.record(step)
            self._ready(self.runs[run_id], [step], now)
        else:
            self._finish(step, state, now, reason=why)
            self.book.finish_run_if_done(run_id, now)
        return None

    def _flow_tick(self, now: float) -> None:
        for run_id, name in self.flow.overdue(now):
            step = self.book.step(run_id, name)
            timeout = f"no answer within {step.spec.timeout_s:g} s" if step else ""
            self.approve(run_id, name, False, TIMEOUT_BY, timeout, now)
        for member in self.flow.take_admitted():
            run_id, _, name = member.partition("/")
            run = self.runs.get(run_id)
            if run is None or run.state.terminal:
                continue
            if not name:
                run.admitted, run.reason = True, ""
                self._out.record(run)
                self._start_run(run, now)
                continue
            step = self.book.step(run_id, name)
            if step is not None and step.state is StepState.QUEUED:
                step.admitted, step.reason = True, ""
                self._ready(run, [step], now)
        self.flow.refresh()
