"""Following a run (`cicd-ray run`, `submit --follow`, `Run.wait`) with the master's long poll,
through a master that restarts."""

from __future__ import annotations

import pytest

from cicd_ray import follow as following
from cicd_ray.errors import MasterUnavailable
from cicd_ray.protocol import RunChange


def script(*answers):
    """A view that answers in turn: a state, or an exception to raise."""
    answers = list(answers)

    def view(run_id: str) -> dict:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return {"run": {"id": run_id, "state": answer}}

    return view


class Waits:
    """A long poll that answers at once, recording where each wait was from; its states are
    given in turn (the last one repeats)."""

    def __init__(self, *failures: Exception, states=("running",)) -> None:
        self.positions: list[str | None] = []
        self.until_end: list[bool] = []
        self.failures = list(failures)
        self.states = list(states)
        self.n = 0

    def __call__(
        self, run_id: str, after: str | None, timeout_s: float, until_end: bool
    ) -> RunChange:
        if self.failures:
            raise self.failures.pop(0)
        self.positions.append(after)
        self.until_end.append(until_end)
        self.n += 1
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return RunChange(run_id=run_id, state=state, position=f"1.0:{self.n}")


@pytest.fixture(autouse=True)
def no_pause(monkeypatch):
    monkeypatch.setattr(following, "VIEW_INTERVAL_S", 0)


def run(view, wait, **kw):
    return following.follow(view, wait, "r1", lambda v: v["run"]["state"], **kw)


def test_each_view_is_read_after_the_run_changed_since_the_last_position():
    waits, seen = Waits(), []
    final = run(
        script("queued", "running", "succeeded"),
        waits,
        on_update=lambda v: seen.append(v["run"]["state"]),
    )
    assert final["run"]["state"] == "succeeded"
    assert seen == ["queued", "running", "succeeded"]
    # The first wait only learns where "now" is (before the first view); each later one
    # waits from the position the previous one gave, so no change between them is lost.
    assert waits.positions == [None, "1.0:1", "1.0:2"]
    assert waits.until_end == [False, False, False]


def test_without_a_listener_only_the_end_is_waited_for():
    """No view is read for the changes on the way: the master's long poll answers at the end
    (or after its timeout: then the follower waits again)."""
    waits = Waits(states=("queued", "running", "running", "succeeded"))
    final = run(script("queued", "succeeded"), waits)
    assert final["run"]["state"] == "succeeded"
    assert waits.until_end == [False, True, True, True]  # two views: the first and the end


def test_busy_runs_are_viewed_at_most_every_interval(monkeypatch):
    monkeypatch.setattr(following, "VIEW_INTERVAL_S", 0.05)
    slept = []
    monkeypatch.setattr(following.time, "sleep", slept.append)
    run(script("queued", "running", "succeeded"), Waits(), on_update=lambda v: None)
    assert slept == [0.05, 0.05]


def test_a_master_that_restarts_is_waited_for(monkeypatch):
    monkeypatch.setattr(following, "RETRY_S", 0)
    gone = MasterUnavailable("restarting")
    seen = []
    final = run(
        script("running", gone, gone, "running", "succeeded"),
        Waits(gone),
        on_update=lambda v: seen.append(v["run"]["state"]),
    )
    assert final["run"]["state"] == "succeeded"
    assert seen == ["running", "running", "succeeded"]


def test_a_master_silent_past_the_outage_limit_is_an_error(monkeypatch):
    monkeypatch.setattr(following, "MASTER_OUTAGE_S", 0.05)
    monkeypatch.setattr(following, "RETRY_S", 0.01)
    gone = MasterUnavailable("down for good")
    with pytest.raises(MasterUnavailable, match="down for good"):
        run(script("running", *[gone] * 1000), Waits(), on_update=lambda v: None)


def test_the_caller_s_timeout_still_applies():
    with pytest.raises(TimeoutError, match="still running after 0 s"):
        run(script("running", "running"), Waits(), timeout_s=0)
