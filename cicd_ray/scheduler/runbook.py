"""The runs being worked on, as a DAG: each step's unmet needs (those not ended yet) and
dependents, the steps still open, skips that follow a failed need, what a step's `if:` is
evaluated against, and the end of a run once its last step ends.

Finished runs are dropped from memory (the store keeps them).
"""

from __future__ import annotations

from collections.abc import Callable

from cicd_ray.pipeline.conditions import Condition, Facts, compiled
from cicd_ray.records import RunRecord, StepRecord
from cicd_ray.scheduler.decisions import Decisions
from cicd_ray.states import RunState, StepState, move

BAD = frozenset({StepState.FAILED, StepState.TIMED_OUT})


def settled_by_needs(step: StepRecord) -> bool:
    """A step whose condition needs every need to succeed (no `if:`, or one naming no status
    function) is settled as soon as one does not: it is skipped without waiting for the rest."""
    return not step.spec.condition or not compiled(step.spec.condition).waits_for_all


class RunBook:
    """The active runs as DAGs: each step's unmet needs, the steps an ended step releases, and
    a run's end once every step has ended."""

    def __init__(
        self, out: Decisions, ended: Callable[[RunRecord | StepRecord], None] = lambda record: None
    ) -> None:
        self.out = out
        self._ended = ended  # told of every step and run that ends (concurrency groups)
        self.runs: dict[str, RunRecord] = {}
        self.steps: dict[str, dict[str, StepRecord]] = {}
        self._unmet: dict[tuple[str, str], set[str]] = {}
        self._dependents: dict[tuple[str, str], list[str]] = {}
        self._open: dict[str, int] = {}

    def step(self, run_id: str, name: str) -> StepRecord | None:
        return self.steps.get(run_id, {}).get(name)

    def unmet(self, run_id: str, name: str) -> set[str]:
        return self._unmet[(run_id, name)]

    def dependents(self, run_id: str, name: str) -> list[str]:
        return self._dependents.get((run_id, name), [])

    def adopt(self, run: RunRecord, steps: list[StepRecord]) -> None:
        """Take up a run (new, or restored: the needs already met are not waited for)."""
        self.runs[run.id] = run
        self.steps[run.id] = {s.name: s for s in steps}
        self._open[run.id] = sum(1 for s in steps if not s.state.terminal)
        done = {s.name for s in steps if s.state.terminal}
        for s in steps:
            self._unmet[(run.id, s.name)] = set(s.spec.needs) - done
            for need in s.spec.needs:
                self._dependents.setdefault((run.id, need), []).append(s.name)

    def start(self, run: RunRecord, now: float) -> None:
        """The run's first attempt started."""
        if run.state is RunState.QUEUED:
            move(run, RunState.RUNNING)
            run.started_at = now
            self.out.record(run)

    def finish_step(
        self, step: StepRecord, state: StepState, now: float, reason: str
    ) -> list[StepRecord]:
        """End a step; returns the dependents it was the last open need of (their condition
        decides next). Those it settles are skipped, and theirs in turn (a worklist: a chain of
        thousands of needs must not exhaust the stack)."""
        ready: list[StepRecord] = []
        todo = [(step, state, reason)]
        marked = {step.name}
        while todo:
            step, state, reason = todo.pop()
            move(step, state)
            step.finished_at = now
            step.reason = reason
            self.out.record(step)
            self._open[step.run_id] -= 1
            self._ended(step)
            run_steps = self.steps[step.run_id]
            for name in self.dependents(step.run_id, step.name):
                dependent = run_steps[name]
                if dependent.state is not StepState.QUEUED or name in marked:
                    continue
                unmet = self._unmet[(step.run_id, name)]
                unmet.discard(step.name)
                if state is not StepState.SUCCEEDED and settled_by_needs(dependent):
                    marked.add(name)
                    todo.append(
                        (dependent, StepState.SKIPPED, f"needs {step.name} ({state.value})")
                    )
                elif not unmet:
                    ready.append(dependent)
        return ready

    def facts(self, step: StepRecord, condition: Condition) -> Facts:
        """What the step's `if:` reads: its needs' and ancestors' states, env, matrix, run.
        The ancestors are walked only for a condition that names `failure()`: every step is
        decided this way, and a walk for each would make a long chain quadratic."""
        run = self.runs[step.run_id]
        run_steps = self.steps[step.run_id]
        needs = [run_steps[n] for n in step.spec.needs if n in run_steps]
        return Facts(
            success=all(n.state is StepState.SUCCEEDED for n in needs) and not run.cancel_requested,
            failure="failure" in condition.statuses
            and any(a.state in BAD for a in self._ancestors(step)),
            cancelled=run.cancel_requested,
            env=step.spec.env,
            matrix=step.spec.matrix,
            run=run.variables,
        )

    def _ancestors(self, step: StepRecord) -> list[StepRecord]:
        run_steps = self.steps[step.run_id]
        seen: set[str] = set()
        todo = list(step.spec.needs)
        while todo:
            name = todo.pop()
            if name not in seen and name in run_steps:
                seen.add(name)
                todo.extend(run_steps[name].spec.needs)
        return [run_steps[n] for n in seen]

    def finish_run_if_done(self, run_id: str, now: float) -> None:
        """End the run once no step of it is open, and forget it."""
        run = self.runs.get(run_id)
        if run is None or run.state.terminal or self._open[run_id] > 0:
            return
        steps = self.steps[run_id]
        bad = [n for n, s in steps.items() if s.state in BAD]
        if run.cancel_requested:
            final = RunState.CANCELLED
        elif bad:
            final = RunState.FAILED
            run.reason = "failed steps: " + ", ".join(bad)
        elif any(s.state is StepState.CANCELLED for s in steps.values()):
            final = RunState.CANCELLED  # a step a newer run of its concurrency group replaced
        else:
            final = RunState.SUCCEEDED  # skipped steps were skipped by their condition
        if run.state is RunState.QUEUED and final is not RunState.CANCELLED:
            move(run, RunState.RUNNING)
        self._end(run, final, now)

    def abandon(self, run: RunRecord, reason: str, now: float) -> None:
        """End a run as failed without touching its steps (they could not be followed)."""
        run.reason = reason[:1000]
        self._end(run, RunState.FAILED, now)

    def _end(self, run: RunRecord, state: RunState, now: float) -> None:
        move(run, state)
        run.finished_at = now
        self.out.record(run)
        self.out.ended_runs.append(run)
        self._ended(run)
        self.forget(run.id)

    def forget(self, run_id: str) -> None:
        for name in self.steps.pop(run_id, {}):
            self._unmet.pop((run_id, name), None)
            self._dependents.pop((run_id, name), None)
        self._open.pop(run_id, None)
        self.runs.pop(run_id, None)


def failed_part(steps: list[StepRecord]) -> set[str]:
    """What a re-run of the failed part runs: the steps that did not succeed (failed, timed
    out, cancelled, skipped) and every step that needs one of them, however indirectly."""
    dependents: dict[str, list[str]] = {}
    for s in steps:
        for need in s.spec.needs:
            dependents.setdefault(need, []).append(s.name)
    todo = [s.name for s in steps if s.state is not StepState.SUCCEEDED]
    out: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo.extend(dependents.get(name, []))
    return out
