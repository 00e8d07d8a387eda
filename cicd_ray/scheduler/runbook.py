"""The runs being worked on, as a DAG: each step's unmet needs and dependents, the steps still
open, skips that follow a failed need, and the end of a run once its last step ends.

Finished runs are dropped from memory (the store keeps them).
"""

from __future__ import annotations

from cicd_ray.records import RunRecord, StepRecord
from cicd_ray.scheduler.decisions import Decisions
from cicd_ray.states import RunState, StepState, move


class RunBook:
    def __init__(self, out: Decisions) -> None:
        self.out = out
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
        done = {s.name for s in steps if s.state is StepState.SUCCEEDED}
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

    def finish_step(self, step: StepRecord, state: StepState, now: float,
                    reason: str) -> list[StepRecord]:
        """End a step; returns the dependents it was the last need of (now ready). Those it can
        no longer satisfy are skipped, and theirs in turn (a worklist: a chain of thousands of
        needs must not exhaust the stack)."""
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
            run_steps = self.steps[step.run_id]
            for name in self.dependents(step.run_id, step.name):
                dependent = run_steps[name]
                if dependent.state is not StepState.QUEUED:
                    continue
                unmet = self._unmet[(step.run_id, name)]
                if state is StepState.SUCCEEDED:
                    unmet.discard(step.name)
                    if not unmet:
                        ready.append(dependent)
                elif name not in marked:
                    marked.add(name)
                    todo.append((dependent, StepState.SKIPPED,
                                 f"needs {step.name} ({state.value})"))
        return ready

    def finish_run_if_done(self, run_id: str, now: float) -> None:
        """End the run once no step of it is open, and forget it."""
        run = self.runs.get(run_id)
        if run is None or run.state.terminal or self._open[run_id] > 0:
            return
        steps = self.steps[run_id]
        if run.cancel_requested:
            final = RunState.CANCELLED
        elif all(s.state is StepState.SUCCEEDED for s in steps.values()):
            final = RunState.SUCCEEDED
        else:
            final = RunState.FAILED
            bad = [n for n, s in steps.items()
                   if s.state not in (StepState.SUCCEEDED, StepState.SKIPPED)]
            run.reason = "failed steps: " + ", ".join(bad)
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
