"""The states of runs, steps, attempts and workers, the moves allowed between them, and `move`,
the one call that changes a record's state (it checks, then assigns).

States are string enums so records serialise to JSON as plain strings.
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar, Literal, Protocol

from cicd_ray.errors import InvalidTransition

Kind = Literal["run", "step", "attempt", "worker"]


class StepState(str, Enum):
    QUEUED = "queued"
    WAITING_APPROVAL = "waiting_approval"  # an `approval:` step, using no worker
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
    {
        StepState.SUCCEEDED,
        StepState.FAILED,
        StepState.TIMED_OUT,
        StepState.CANCELLED,
        StepState.SKIPPED,
    }
)
RUN_TERMINAL = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})

_S, _R, _W = StepState, RunState, WorkerState
MOVES: dict[Kind, dict[Enum, frozenset[Enum]]] = {
    "run": {
        _R.QUEUED: frozenset({_R.RUNNING, _R.CANCELLED, _R.FAILED}),
        _R.RUNNING: frozenset({_R.SUCCEEDED, _R.FAILED, _R.CANCELLED}),
    },
    "step": {
        _S.QUEUED: frozenset({_S.RUNNING, _S.CANCELLED, _S.SKIPPED, _S.WAITING_APPROVAL}),
        # Released with a script to run (QUEUED) or without one (SUCCEEDED); rejected or not
        # answered in time (FAILED); its run cancelled.
        _S.WAITING_APPROVAL: frozenset({_S.QUEUED, _S.SUCCEEDED, _S.FAILED, _S.CANCELLED}),
        # RUNNING -> QUEUED is a retry: the attempt ended and another one will be made.
        _S.RUNNING: frozenset({_S.QUEUED, _S.SUCCEEDED, _S.FAILED, _S.TIMED_OUT, _S.CANCELLED}),
    },
    # An attempt is made running and ends once; its step may be tried again by a new one.
    "attempt": {
        _S.RUNNING: frozenset({_S.SUCCEEDED, _S.FAILED, _S.TIMED_OUT, _S.CANCELLED}),
    },
    "worker": {
        _W.STARTING: frozenset({_W.READY, _W.LOST, _W.STOPPED}),
        _W.READY: frozenset({_W.LOST, _W.STOPPED}),
    },
}
_ENUMS: dict[Kind, type[Enum]] = {
    "run": RunState,
    "step": StepState,
    "attempt": StepState,
    "worker": WorkerState,
}


class Stateful(Protocol):
    """A record with a state: RunRecord, StepRecord, AttemptRecord, WorkerRecord."""

    kind: ClassVar[Kind]
    state: Enum


def check(kind: Kind, current: Enum, new: Enum) -> None:
    """Raise InvalidTransition unless a `kind` may go from `current` to `new`. Terminal states
    never change."""
    if type(new) is not _ENUMS[kind] or new not in MOVES[kind].get(current, frozenset()):
        raise InvalidTransition(f"{kind} state cannot change from {current.value} to {new.value}")


def move(record: Stateful, new: Enum) -> None:
    """Change the record's state, if its kind may make that move."""
    check(record.kind, record.state, new)
    record.state = new
