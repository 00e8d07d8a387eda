"""A clock a test sets by hand: the master's core takes its time from a callable (it never reads
the system's clock itself), so a test moves time by assigning `now`."""

from __future__ import annotations


class ManualClock:
    """`clock()` answers `clock.now`, which only the test changes."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
