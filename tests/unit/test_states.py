from __future__ import annotations

import itertools

import pytest

from cicd_ray.errors import InvalidTransition
from cicd_ray.states import RUN_TERMINAL, STEP_TERMINAL, RunState, StepState, transition

S, R = StepState, RunState
# Every move a step or a run may make, written out here rather than read from the module: a
# move added or dropped there fails this table.
ALLOWED = [  # a list: a set would merge (S.QUEUED, S.RUNNING) and (R.QUEUED, R.RUNNING)
    (S.QUEUED, S.RUNNING), (S.QUEUED, S.CANCELLED), (S.QUEUED, S.SKIPPED),
    (S.RUNNING, S.QUEUED),  # a retry
    (S.RUNNING, S.SUCCEEDED), (S.RUNNING, S.FAILED), (S.RUNNING, S.TIMED_OUT),
    (S.RUNNING, S.CANCELLED),
    (R.QUEUED, R.RUNNING), (R.QUEUED, R.CANCELLED), (R.QUEUED, R.FAILED),
    (R.RUNNING, R.SUCCEEDED), (R.RUNNING, R.FAILED), (R.RUNNING, R.CANCELLED),
]
PAIRS = [*itertools.product(StepState, StepState), *itertools.product(RunState, RunState),
         *itertools.product(StepState, RunState)]


@pytest.mark.parametrize("current, new", PAIRS, ids=lambda s: f"{type(s).__name__}.{s.value}")
def test_exactly_the_listed_moves_are_allowed(current, new):
    # Compared with their kinds: StepState.QUEUED == RunState.QUEUED == "queued".
    if any(type(a) is type(current) and type(b) is type(new) and (a, b) == (current, new)
           for a, b in ALLOWED):
        transition(current, new)  # raises if refused
    else:
        with pytest.raises(InvalidTransition, match=f"from {current.value} to {new.value}"):
            transition(current, new)


@pytest.mark.parametrize("state", sorted(STEP_TERMINAL) + sorted(RUN_TERMINAL))
def test_terminal_states_never_change(state):
    targets = StepState if isinstance(state, StepState) else RunState
    assert state.terminal
    for new in targets:
        with pytest.raises(InvalidTransition, match=f"from {state.value} to {new.value}"):
            transition(state, new)


def test_states_serialise_as_plain_strings():
    assert StepState.TIMED_OUT == "timed_out" and RunState.CANCELLED.value == "cancelled"
