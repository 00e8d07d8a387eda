"""The read side of what runs recorded, typed, over any store: a run's view, a page of runs, a
step's log, the audit trail, a run's project, and why a step ran (`explain`). The API answers
from it (in its replicas, or through the master where the store cannot be reached from them),
the master answers from it, and the CLI reads a store file with it.
"""

from __future__ import annotations

from cicd_ray.errors import NotFound
from cicd_ray.protocol import LogSlice, Missing, RunView
from cicd_ray.reads.explain import Explanation, explain_answer
from cicd_ray.records import AuditRecord, RunRecord
from cicd_ray.states import RunState, StepState
from cicd_ray.store.base import Store


def run_view(store: Store, run_id: str) -> RunView | None:
    """A run with all its steps and attempts: what `status` and the API show."""
    run = store.get_run(run_id)
    if run is None:
        return None
    return RunView(
        run=run,
        steps=store.get_steps(run_id),
        attempts=store.get_attempts(run_id),
        deliveries=store.get_deliveries(run_id),
    )


def runs_page(
    store: Store,
    state: str | None = None,
    pipeline: str | None = None,
    limit: int = 50,
    offset: int = 0,
    project: str | None = None,
) -> list[RunRecord]:
    """A page of runs, newest first; `project`: only that project's."""
    return store.list_runs(RunState(state) if state else None, pipeline, limit, offset, project)


def run_project(store: Store, run_id: str) -> str | None:
    """The project a run belongs to; None for an unknown run."""
    run = store.get_run(run_id)
    return run.project if run else None


def audit_page(store: Store, limit: int = 100, offset: int = 0) -> list[AuditRecord]:
    """A page of the audit trail, newest first."""
    return store.list_audit(limit, offset)


def log_answer(
    store: Store, run_id: str, step: str, attempt: int | None = None, offset: int = 0
) -> LogSlice | Missing:
    """`step_log` for a caller across a process boundary: Missing instead of NotFound."""
    try:
        return step_log(store, run_id, step, attempt, offset)
    except NotFound as e:
        return Missing(detail=str(e))


def step_log(
    store: Store, run_id: str, step: str, attempt: int | None = None, offset: int = 0
) -> LogSlice:
    """A step's log from byte `offset`, as every reader of a store answers it (attempt None:
    not started yet). Raises NotFound naming what is unknown."""
    run = store.get_run(run_id)
    if run is None:
        raise NotFound(f"run {run_id!r} not found")
    attempts = store.get_attempts(run_id, step)
    if not attempts:
        names = [s.name for s in store.get_steps(run_id)]
        if step not in names:
            raise NotFound(f"run {run_id} has no step {step!r}; its steps are: {', '.join(names)}")
        # Not started yet: a follower waits for its first attempt.
        return LogSlice(attempt=None, state="queued", data=b"", more=not run.state.terminal)
    chosen = (
        attempts[-1]
        if attempt is None
        else next((a for a in attempts if a.number == attempt), None)
    )
    if chosen is None:
        raise NotFound(f"step {step!r} has attempts 1 to {len(attempts)}, not {attempt}")
    return LogSlice(
        attempt=chosen.number,
        state=chosen.state.value,
        data=store.read_log(chosen.id, offset),
        more=chosen.state is StepState.RUNNING,
    )


class Reads:
    """The reads over one store, each answer a typed model; what crosses a process boundary
    says `Missing` rather than raising."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def run(self, run_id: str) -> RunView | None:
        return run_view(self.store, run_id)

    def runs(
        self,
        state: str | None = None,
        pipeline: str | None = None,
        limit: int = 50,
        offset: int = 0,
        project: str | None = None,
    ) -> list[RunRecord]:
        return runs_page(self.store, state, pipeline, limit, offset, project)

    def step_log(
        self, run_id: str, step: str, attempt: int | None = None, offset: int = 0
    ) -> LogSlice | Missing:
        return log_answer(self.store, run_id, step, attempt, offset)

    def explain(self, run_id: str, step: str) -> Explanation | Missing:
        return explain_answer(self.store, run_id, step)

    def project_of(self, run_id: str) -> str | None:
        return run_project(self.store, run_id)

    def audit(self, limit: int = 100, offset: int = 0) -> list[AuditRecord]:
        return audit_page(self.store, limit, offset)
