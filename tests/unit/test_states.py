from __future__ import annotations

import itertools

import pytest

from cicd_ray.errors import InvalidTransition
from cicd_ray.records import AttemptRecord, RunRecord, WorkerRecord
from cicd_ray.states import (
    RUN_TERMINAL,
    STEP_TERMINAL,
    RunState,
    StepState,
    WorkerState,
    check,
    move,
)

S, R = StepState, RunState
# Every move a step or a run may make, written out here rather than read from the module: a
# move added or dropped there fails this table.
ALLOWED = [  # a list: a set would merge (S.QUEUED, S.RUNNING) and (R.QUEUED, R.RUNNING)
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.CANCELLED),
    (S.QUEUED, S.SKIPPED),
    (S.QUEUED, S.WAITING_APPROVAL),
    (S.WAITING_APPROVAL, S.QUEUED),  # approved, with a script to run
    (S.WAITING_APPROVAL, S.SUCCEEDED),
    (S.WAITING_APPROVAL, S.FAILED),
    (S.WAITING_APPROVAL, S.CANCELLED),
    (S.RUNNING, S.QUEUED),  # a retry
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.TIMED_OUT),
    (S.RUNNING, S.CANCELLED),
    (R.QUEUED, R.RUNNING),
    (R.QUEUED, R.CANCELLED),
    (R.QUEUED, R.FAILED),
    (R.RUNNING, R.SUCCEEDED),
    (R.RUNNING, R.FAILED),
    (R.RUNNING, R.CANCELLED),
]


def kind_of(state):
    return "step" if isinstance(state, StepState) else "run"


PAIRS = [
    *itertools.product(StepState, StepState),
    *itertools.product(RunState, RunState),
    *itertools.product(StepState, RunState),
]


@pytest.mark.parametrize("current, new", PAIRS, ids=lambda s: f"{type(s).__name__}.{s.value}")
def test_exactly_the_listed_moves_are_allowed(current, new):
    # Compared with their kinds: StepState.QUEUED == RunState.QUEUED == "queued".
    if any(
        type(a) is type(current) and type(b) is type(new) and (a, b) == (current, new)
        for a, b in ALLOWED
    ):
        check(kind_of(current), current, new)  # raises if refused
    else:
        with pytest.raises(InvalidTransition, match=f"from {current.value} to {new.value}"):
            check(kind_of(current), current, new)


@pytest.mark.parametrize("state", sorted(STEP_TERMINAL) + sorted(RUN_TERMINAL))
def test_terminal_states_never_change(state):
    targets = StepState if isinstance(state, StepState) else RunState
    assert state.terminal
    for new in targets:
        with pytest.raises(InvalidTransition, match=f"from {state.value} to {new.value}"):
            check(kind_of(state), state, new)


def test_states_serialise_as_plain_strings():
    assert StepState.TIMED_OUT == "timed_out" and RunState.CANCELLED.value == "cancelled"


A, W = "attempt", WorkerState
ATTEMPT_ALLOWED = [
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.TIMED_OUT),
    (S.RUNNING, S.CANCELLED),
]
WORKER_ALLOWED = [
    (W.STARTING, W.READY),
    (W.STARTING, W.LOST),
    (W.STARTING, W.STOPPED),
    (W.READY, W.LOST),
    (W.READY, W.STOPPED),
]


@pytest.mark.parametrize(
    "kind, allowed, states",
    [("attempt", ATTEMPT_ALLOWED, StepState), ("worker", WORKER_ALLOWED, WorkerState)],
)
def test_attempts_and_workers_make_exactly_the_listed_moves(kind, allowed, states):
    for current, new in itertools.product(states, states):
        if (current, new) in allowed:
            check(kind, current, new)
        else:
            with pytest.raises(
                InvalidTransition,
                match=f"{kind} state cannot change from {current.value} to {new.value}",
            ):
                check(kind, current, new)


def test_move_checks_then_assigns_and_a_refused_move_changes_nothing():
    worker = WorkerRecord(id="w", pool="p", cpus=1, memory_mb=0, started_at=0)
    move(worker, W.READY)
    assert worker.state is W.READY
    with pytest.raises(
        InvalidTransition, match="worker state cannot change from ready to starting"
    ):
        move(worker, W.STARTING)
    assert worker.state is W.READY
    attempt = AttemptRecord(
        id="r/a/1", run_id="r", step="a", number=1, worker_id="w", queued_at=0, started_at=0
    )
    move(attempt, S.FAILED)
    with pytest.raises(InvalidTransition, match="attempt state cannot change from failed"):
        move(attempt, S.RUNNING)  # a retry is a new attempt, never the old one again
    run = RunRecord(id="r", pipeline="p", created_at=0)
    with pytest.raises(InvalidTransition, match="run state"):
        move(run, W.READY)  # another kind's state
