"""Following a run (`cicd-ray run`, `submit --follow`) through a master that restarts."""

from __future__ import annotations

import pytest

from cicd_ray import backends
from cicd_ray.errors import MasterUnavailable


def views(*answers):
    answers = list(answers)

    def view(run_id: str) -> dict:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return {"run": {"id": run_id, "state": answer}}
    return view


def test_a_master_that_restarts_is_waited_for():
    gone = MasterUnavailable("restarting")
    seen = []
    final = backends.follow(views("running", gone, gone, "running", "succeeded"), "r1",
                            on_update=lambda v: seen.append(v["run"]["state"]), poll_s=0)
    assert final["run"]["state"] == "succeeded"
    assert seen == ["running", "running", "succeeded"]


def test_a_master_silent_past_the_outage_limit_is_an_error(monkeypatch):
    monkeypatch.setattr(backends, "MASTER_OUTAGE_S", 0.05)
    gone = MasterUnavailable("down for good")
    with pytest.raises(MasterUnavailable, match="down for good"):
        backends.follow(views("running", *[gone] * 1000), "r1", poll_s=0.01)


def test_the_caller_s_timeout_still_applies():
    with pytest.raises(TimeoutError, match="still running after 0 s"):
        backends.follow(views("running", "running"), "r1", poll_s=0, timeout_s=0)
