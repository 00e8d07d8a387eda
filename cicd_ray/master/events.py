"""The run and step changes the master committed, numbered, for GET /api/v1/events and for
following a run: an observer of the master's commits, with no Ray in it.

Numbers start over when a master starts; its `epoch` (its start time) tells a client that they
did. Only the latest EVENTS_KEPT are kept: a client further behind is told of the gap.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

from cicd_ray.master.commit import Observer
from cicd_ray.records import Changes

EVENTS_KEPT = 10_000


class EventLog(Observer):
    """The last committed changes, numbered within an epoch (the master's start), for clients
    that follow them; wakes the long polls when a batch is committed."""

    def __init__(
        self, epoch: float, kept: int = EVENTS_KEPT, on_new: Callable[[], None] | None = None
    ) -> None:
        self.epoch = epoch
        self.seq = 0
        self._events: deque[dict] = deque(maxlen=kept)
        self._last: OrderedDict[str, int] = OrderedDict()  # run id -> its latest event's number
        self._last_run: OrderedDict[str, int] = OrderedDict()  # the same, of the run itself
        self._kept = kept
        self.on_new = on_new  # told after each batch (the master wakes its long polls)

    def committed(self, changes: Changes, took_s: float, now: float) -> None:
        # Steps first: a run that ends in this batch ended because of them.
        for step in changes.steps.values():
            self._add(
                "step",
                {
                    "run_id": step.run_id,
                    "project": step.project,
                    "step": step.name,
                    "state": step.state.value,
                    "attempts": step.attempts,
                    "worker_id": step.worker_id,
                    "reason": step.reason,
                },
                now,
            )
        for run in changes.runs.values():
            self._add(
                "run",
                {
                    "run_id": run.id,
                    "project": run.project,
                    "pipeline": run.pipeline,
                    "state": run.state.value,
                    "reason": run.reason,
                },
                now,
            )
        if self.on_new is not None and (changes.steps or changes.runs):
            self.on_new()

    def _add(self, kind: str, data: dict, now: float) -> None:
        self.seq += 1
        self._events.append({"seq": self.seq, "kind": kind, "at": now, **data})
        for latest in (self._last, self._last_run) if kind == "run" else (self._last,):
            latest[data["run_id"]] = self.seq
            latest.move_to_end(data["run_id"])
            if len(latest) > self._kept:
                latest.popitem(last=False)

    def restarted_since(self, epoch: float | None) -> bool:
        return epoch is not None and epoch != self.epoch

    def has_news(self, after: int, epoch: float | None) -> bool:
        return self.restarted_since(epoch) or self.seq > after

    def page(self, after: int, epoch: float | None) -> dict:
        """Events numbered after `after`. From another master's `epoch` the numbering starts
        over: `reset` says so, and `gap` that changes were missed (the client reloads)."""
        reset = self.restarted_since(epoch)
        if reset:
            after = 0
        found = [e for e in self._events if e["seq"] > after]
        oldest = self._events[0]["seq"] if self._events else self.seq + 1
        return {
            "epoch": self.epoch,
            "events": found,
            "reset": reset,
            "gap": bool(after) and after + 1 < oldest,
        }

    @property
    def position(self) -> str:
        """Where a follower waits from: `EPOCH:SEQ`."""
        return f"{self.epoch}:{self.seq}"

    def run_changed(
        self, run_id: str, after: int, epoch: float | None, itself: bool = False
    ) -> bool:
        """Whether the run (`itself`: the run, not only a step of it) has changed since event
        `after` of master `epoch` (True when the master is another one: the caller looks
        again)."""
        latest = self._last_run if itself else self._last
        return self.restarted_since(epoch) or latest.get(run_id, 0) > after


def parse_position(text: str | None) -> tuple[float | None, int]:
    """`EPOCH:SEQ` (a Last-Event-ID, a follower's position); (None, -1) when there is none."""
    epoch, _, seq = (text or "").partition(":")
    try:
        return float(epoch), int(seq)
    except ValueError:
        return None, -1
