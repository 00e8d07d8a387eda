from __future__ import annotations

import pytest

from cicd_ray.errors import InvalidTransition
from cicd_ray.states import RUN_TERMINAL, STEP_TERMINAL, RunState, StepState, transition


def test_allowed_moves():
    transition(StepState.QUEUED, StepState.RUNNING)
    transition(StepState.RUNNING, StepState.QUEUED)  # a retry
    transition(StepState.QUEUED, StepState.SKIPPED)
    transition(RunState.QUEUED, RunState.RUNNING)
    transition(RunState.RUNNING, RunState.SUCCEEDED)


@pytest.mark.parametrize("state", sorted(STEP_TERMINAL) + sorted(RUN_TERMINAL))
def test_terminal_states_never_change(state):
    targets = StepState if isinstance(state, StepState) else RunState
    for new in targets:
        with pytest.raises(InvalidTransition, match=f"from {state.value} to {new.value}"):
            transition(state, new)


def test_states_serialise_as_plain_strings():
    assert StepState.TIMED_OUT == "timed_out" and RunState.CANCELLED.value == "cancelled"
