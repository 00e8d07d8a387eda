"""The event stream's wire format (Server-Sent Events), driven by a scripted master: the pure
unit is `runs._event_stream`, which turns the master's answers into bytes."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import HTTPException

from cicd_ray.api import runs
from cicd_ray.api.link import MasterLink


class Scripted:
    """A transport to the master that answers `events` calls from a list, and records what
    was asked."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.asked: list[tuple] = []

    async def __call__(self, method: str, args: tuple, timeout_s: float):
        assert method == "events"
        self.asked.append(args)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def answer(epoch=100.0, events=(), reset=False, gap=False) -> dict:
    return {"epoch": epoch, "events": list(events), "reset": reset, "gap": gap}


def event(seq: int, run_id: str = "r1", project: str = "default") -> dict:
    return {"seq": seq, "kind": "step", "run_id": run_id, "project": project, "state": "running"}


def read(
    master: Scripted, count: int, run_id=None, epoch=None, after=-1, project=None
) -> list[bytes]:
    async def take():
        out = []
        stream = runs._event_stream(MasterLink(master), run_id, project, epoch, after)
        async for chunk in stream:
            out.append(chunk)
            if len(out) == count:
                await stream.aclose()
                return out

    return asyncio.run(take())


def test_the_stream_opens_with_a_retry_hint_and_a_new_client_starts_from_now():
    master = Scripted(answer(events=[event(4), event(5)]), answer(events=[event(6)]))
    chunks = read(master, 3)
    assert chunks[0] == b"retry: 2000\n\n"
    assert chunks[1] == b": keep-alive\n\n"  # the past is not sent to a new client
    assert chunks[2].startswith(b"id: 100.0:6\nevent: step\ndata: {")
    assert master.asked == [(0, None, 0.0), (5, 100.0, runs.EVENT_WAIT_S)]


def test_a_quiet_stream_sends_keep_alives():
    master = Scripted(answer(), answer(), answer())
    assert read(master, 4, epoch=100.0, after=3)[1:] == [b": keep-alive\n\n"] * 3


@pytest.mark.parametrize(
    "case",
    [
        {"epoch": 99.0},  # the client's epoch is an earlier master's: it restarted
        {"reset": True},  # the master says the numbering started over
        {"gap": True},  # events the client did not see were dropped
    ],
)
def test_missed_changes_are_announced_with_a_reset_event(case):
    given = {"epoch": 100.0, "reset": False, "gap": False, **case}
    master = Scripted(
        answer(epoch=100.0, events=[event(1)], reset=given["reset"], gap=given["gap"])
    )
    chunks = read(master, 3, epoch=given["epoch"], after=7)
    assert chunks[1] == b"event: reset\ndata: {}\n\n"
    assert chunks[2].startswith(b"id: 100.0:1\n")


def test_one_run_s_events_only_and_a_silent_master_is_waited_for(monkeypatch):
    monkeypatch.setattr(runs, "RETRY_AFTER_S", "0")
    down = HTTPException(503, detail="the master is not answering")
    master = Scripted(down, answer(events=[event(8, "other"), event(9, "r1")]))
    chunks = read(master, 3, run_id="r1", epoch=100.0, after=7)
    assert chunks[1] == b": the master is not answering; waiting\n\n"
    assert chunks[2].startswith(b"id: 100.0:9\n") and b'"run_id": "r1"' in chunks[2]


def test_a_project_s_token_is_told_only_of_its_project_s_runs():
    master = Scripted(
        answer(events=[event(8, "a", "ops"), event(9, "b", "web"), event(10, "c", "ops")])
    )
    chunks = read(master, 2, epoch=100.0, after=7, project="web")
    assert chunks[1].startswith(b"id: 100.0:9\n") and b'"run_id": "b"' in chunks[1]
    master = Scripted(answer(events=[event(8, "a", "ops")]), answer())
    assert read(master, 2, epoch=100.0, after=7, project="web")[1] == b": keep-alive\n\n"
