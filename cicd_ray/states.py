"""Run and step states, the transitions allowed between them, and the one function that checks them.

States are string enums so records serialise to JSON as plain strings.
"""

from __future__ import annotations

from enum import Enum

from cicd_ray.errors import InvalidTransition


class StepState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def terminal(self) -> bool:
        return self in STEP_TERMINAL


class RunState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in RUN_TERMINAL


class WorkerState(str, Enum):
    STARTING = "starting"
    READY = "ready"
    LOST = "lost"
    STOPPED = "stopped"


STEP_TERMINAL = frozenset(
    {StepState.SUCCEEDED, StepState.FAILED, StepState.TIMED_OUT, StepState.CANCELLED,
     StepState.SKIPPED}
)
RUN_TERMINAL = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})

_STEP_MOVES: dict[StepState, frozenset[StepState]] = {
    StepState.QUEUED: frozenset({StepState.RUNNING, StepState.CANCELLED, StepState.SKIPPED}),
    # RUNNING -> QUEUED is a retry: the attempt ended and another one will be made.
    StepState.RUNNING: frozenset(
        {StepState.QUEUED, StepState.SUCCEEDED, StepState.FAILED, StepState.TIMED_OUT,
         StepState.CANCELLED}
    ),
}
_RUN_MOVES: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset({RunState.RUNNING, RunState.CANCELLED, RunState.FAILED}),
    RunState.RUNNING: frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED}),
}


def transition(current: StepState | RunState, new: StepState | RunState) -> None:
    """Raise InvalidTransition unless `current -> new` is allowed. Terminal states never change."""
    moves = _STEP_MOVES if isinstance(current, StepState) else _RUN_MOVES
    if type(new) is not type(current) or new not in moves.get(current, frozenset()):
        kind = "step" if isinstance(current, StepState) else "run"
        raise InvalidTransition(f"{kind} state cannot change from {current.value} to {new.value}")
