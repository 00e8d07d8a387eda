"""Following a run to its end, one way for every edge: the master's long poll.

The follower reads the run's view, then waits on the master until the run changes (`wait`
answers at once with a position without one, then whenever the run has changed since it),
and reads again. A change between a view and the next wait is not lost: the wait is from the
position taken before the view. The CLI, the Python client and the tests use it, over Ray or
over HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from cicd_ray.errors import MasterUnavailable
from cicd_ray.protocol import RUN_WAIT_S, RunChange
from cicd_ray.states import RunState

# How long following a run waits for a master that does not answer (a restart takes seconds).
MASTER_OUTAGE_S = 60.0
RETRY_S = 0.5  # between two tries while the master does not answer
VIEW_INTERVAL_S = 0.25  # the least time between two views a follower reads

V = TypeVar("V")
Wait = Callable[[str, "str | None", float, bool], RunChange]  # run, after, timeout, until_end


class _Outage:
    """Calls that tolerate a master that does not answer, for up to MASTER_OUTAGE_S at a time
    (the run goes on without it), and never past the follower's deadline."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.silent_since: float | None = None

    def call(self, fn: Callable[..., V], *args: object) -> V:
        while True:
            try:
                answer = fn(*args)
            except MasterUnavailable:
                now = time.monotonic()
                self.silent_since = self.silent_since or now
                if now - self.silent_since > MASTER_OUTAGE_S or (
                    self.deadline is not None and now > self.deadline
                ):
                    raise
                time.sleep(RETRY_S)
                continue
            self.silent_since = None
            return answer


def follow(
    view: Callable[[str], V],
    wait: Wait,
    run_id: str,
    state_of: Callable[[V], str],
    on_update: Callable[[V], None] | None = None,
    timeout_s: float | None = None,
) -> V:
    """The run's final view, calling `on_update` with each view on the way (at most one per
    VIEW_INTERVAL_S: the changes in between come together). Without `on_update`, only the end
    is waited for. TimeoutError past `timeout_s`; MasterUnavailable after MASTER_OUTAGE_S of
    silence."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    calls = _Outage(deadline)
    position = calls.call(wait, run_id, None, 0.0, False).position
    current = calls.call(view, run_id)
    while True:
        if on_update is not None:
            on_update(current)
        if RunState(state_of(current)).terminal:
            return current
        if on_update is not None:  # let the changes of a busy run come together
            time.sleep(
                VIEW_INTERVAL_S
                if deadline is None
                else max(0.0, min(VIEW_INTERVAL_S, deadline - time.monotonic()))
            )
        left = RUN_WAIT_S if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"run {run_id} still {state_of(current)} after {timeout_s} s")
        change = calls.call(wait, run_id, position, min(left, RUN_WAIT_S), on_update is None)
        position = change.position
        if on_update is None and not RunState(change.state).terminal:
            continue  # only the end matters, and it has not come yet: wait again
        current = calls.call(view, run_id)
