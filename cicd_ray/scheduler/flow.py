"""Flow control: what a step whose needs have ended passes before it is queued, in order — its
`if:` condition, its approval, its concurrency group — and a run's own concurrency group.

Waiting is a state the store keeps (a step `waiting_approval`, a run or step `queued` with the
reason and not yet `admitted`), so a restarted master takes up the same waits in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cicd_ray.pipeline.conditions import compiled, holds
from cicd_ray.pipeline.model import ConcurrencySpec
from cicd_ray.records import Approval, RunRecord, StepRecord
from cicd_ray.scheduler.decisions import Decisions
from cicd_ray.scheduler.groups import Groups
from cicd_ray.scheduler.runbook import RunBook, settled_by_needs
from cicd_ray.states import StepState, move

TIMEOUT_BY = "(timeout)"  # who "rejects" an approval no one answered in time


@dataclass(frozen=True)
class Gate:
    """A step's way on: `go` (queue it), wait (approval or group), or end it as `skip`."""

    go: bool = False
    skip: StepState | None = None
    reason: str = ""


GO, WAIT = Gate(go=True), Gate()
# (member, reason, now): cancel a run (`run_id`) or a step (`run_id/step`) a newer member of
# its group replaces.
Replace = Callable[[str, str, float], None]


GroupKey = tuple[str, str]  # (project, group): a group is its project's alone


def group_key(project: str, c: ConcurrencySpec) -> GroupKey:
    """Concurrency groups are per project: another project's `deploy` (or a fork's pull
    request of it) neither waits for, blocks nor cancels this one's."""
    return (project, c.group)


def waiting_reason(group: str, ahead: int) -> str:
    return f"waiting for concurrency group {group} ({ahead} ahead)"


class Flow:
    """Flow control: the gates a step passes once its needs have ended (its condition, its
    approval, its concurrency group), and runs admitted by their group."""

    def __init__(self, book: RunBook, out: Decisions, replace: Replace) -> None:
        self.book = book
        self.out = out
        self.replace = replace
        self.groups = Groups()
        self.approvals: dict[tuple[str, str], float] = {}  # (run, step) -> when it runs out
        self.admitted: list[str] = []  # members let in since the facade last took them up
        self._touched: set[str] = set()  # groups whose waiting members' reasons may be stale

    # --- runs ---------------------------------------------------------------------------------

    def admit_run(self, run: RunRecord, fresh: bool, now: float) -> bool:
        """Whether a run may start its steps: no group, or a place in it (a `fresh` submission
        with cancel_in_progress replaces the older runs of its group first)."""
        c = run.concurrency
        if c is None or run.admitted:
            return True
        key = group_key(run.project, c)
        if fresh and c.cancel_in_progress:
            self._replace_older(key, run.id, f"run {run.id}", now)
        if self.groups.ask(key, run.id, (run.seq, -1), c.limit):
            run.admitted = True
            run.reason = ""
        else:
            run.reason = waiting_reason(c.group, self.groups.ahead(key, run.id))
            self._touched.add(key)
        self.out.record(run)
        return run.admitted

    # --- steps --------------------------------------------------------------------------------

    def gate(self, run: RunRecord, step: StepRecord, now: float) -> Gate:
        """Decide the way on of a step whose needs have all ended (or whose approval came)."""
        decided = step.approval is not None or step.admitted
        if not decided and not self._holds(step):
            if run.cancel_requested:
                return Gate(skip=StepState.CANCELLED, reason="run cancelled")
            return self._skip(step)
        if step.spec.approval is not None and step.approval is None:
            self._await_approval(run, step, now)
            return WAIT
        c = step.spec.concurrency
        if c is None or step.admitted:
            return GO
        member, key = f"{run.id}/{step.name}", group_key(run.project, c)
        if c.cancel_in_progress and member not in self.groups.members(key):
            self._replace_older(key, member, f"run {run.id}", now)
        if self.groups.ask(key, member, (run.seq, step.spec.index), c.limit):
            step.admitted = True
            step.reason = ""
            self.out.record(step)
            return GO
        step.reason = waiting_reason(c.group, self.groups.ahead(key, member))
        self._touched.add(key)
        self.out.record(step)
        return WAIT

    def still_wanted(self, step: StepRecord) -> bool:
        """For a run being cancelled: whether a queued step may still run. One with a status
        function in its `if:` (`always()`, `cancelled()`) is decided once its needs have ended,
        then by its condition; any other is cancelled now."""
        run = self.book.runs[step.run_id]
        if settled_by_needs(step) or (run.concurrency is not None and not run.admitted):
            return False  # (a run still waiting for its group never started: nothing to clean)
        if self.book.unmet(step.run_id, step.name):
            return True  # decided when its needs end
        return self._holds(step)

    def _holds(self, step: StepRecord) -> bool:
        condition = compiled(step.spec.condition or "success()")
        return holds(condition, self.book.facts(step, condition))

    def _skip(self, step: StepRecord) -> Gate:
        if step.spec.condition:
            step.skipped_by_condition = True
            return Gate(skip=StepState.SKIPPED, reason=f"if: {step.spec.condition} was false")
        bad = [
            n
            for n in step.spec.needs
            if self.book.steps[step.run_id][n].state is not StepState.SUCCEEDED
        ]
        return Gate(skip=StepState.SKIPPED, reason=f"needs {', '.join(bad)} (not succeeded)")

    # --- approvals ----------------------------------------------------------------------------

    def resume_approval(self, run: RunRecord, step: StepRecord, now: float) -> None:
        """A restored step still waiting for approval: its deadline is kept again."""
        self._await_approval(run, step, now)

    def _await_approval(self, run: RunRecord, step: StepRecord, now: float) -> None:
        if step.state is not StepState.WAITING_APPROVAL:
            move(step, StepState.WAITING_APPROVAL)
            step.waiting_since = now
            step.reason = f"waiting for approval: {step.spec.approval.prompt}"
            self.book.start(run, now)
            self.out.record(step)
        self.approvals[(run.id, step.name)] = (step.waiting_since or now) + step.spec.timeout_s

    def answer(
        self, step: StepRecord, approved: bool, by: str, comment: str, now: float
    ) -> tuple[StepState, str]:
        """Record the answer to a waiting step; returns where it goes: QUEUED (approved, with a
        script to run), SUCCEEDED (approved, nothing to run) or FAILED (rejected), and why."""
        self.approvals.pop((step.run_id, step.name), None)
        decision = "approved" if approved else "rejected"
        step.approval = Approval(decision=decision, by=by, at=now, comment=comment)
        why = f"{decision} by {by}" + (f": {comment}" if comment else "")
        if not approved:
            return StepState.FAILED, why
        return (StepState.QUEUED if step.spec.run else StepState.SUCCEEDED), why

    def overdue(self, now: float) -> list[tuple[str, str]]:
        """The (run, step) pairs whose approval's time has run out."""
        return [key for key, deadline in self.approvals.items() if now >= deadline]

    def forget_approval(self, step: StepRecord) -> None:
        self.approvals.pop((step.run_id, step.name), None)

    # --- groups -------------------------------------------------------------------------------

    def _replace_older(self, key: GroupKey, newer: str, by: str, now: float) -> None:
        for member in self.groups.members(key):
            if member != newer:
                self.replace(
                    member, f"cancelled: {by} of concurrency group {key[1]} replaces it", now
                )

    def restore_places(self, runs: list[RunRecord], steps: list[StepRecord]) -> None:
        """Before a restored master takes up runs: the places granted, whatever the count."""
        for run in runs:
            if run.concurrency is not None and run.admitted:
                self.groups.hold(group_key(run.project, run.concurrency), run.id)
        for s in steps:
            if s.spec.concurrency is not None and s.admitted and not s.state.terminal:
                self.groups.hold(group_key(s.project, s.spec.concurrency), f"{s.run_id}/{s.name}")

    def ended(self, record: RunRecord | StepRecord) -> None:
        """A run or step ended (the run book says so): its place goes to the next in line."""
        if isinstance(record, RunRecord):
            c, member = record.concurrency, record.id
        else:
            c, member = record.spec.concurrency, f"{record.run_id}/{record.name}"
            self.forget_approval(record)
        if c is not None:
            key = group_key(record.project, c)
            self.admitted += self.groups.leave(key, member)
            self._touched.add(key)

    def take_admitted(self) -> list[str]:
        out, self.admitted = self.admitted, []
        return out

    def refresh(self) -> None:
        """Renumber the reasons of the members still waiting in the groups that changed."""
        for group in self._touched:
            for member in self.groups.waiting(group):
                record = self._record(member)
                if record is None:
                    continue
                reason = waiting_reason(group[1], self.groups.ahead(group, member))
                if record.reason != reason:
                    record.reason = reason
                    self.out.record(record)
        self._touched.clear()

    def _record(self, member: str) -> RunRecord | StepRecord | None:
        run_id, _, step = member.partition("/")
        return self.book.step(run_id, step) if step else self.book.runs.get(run_id)
