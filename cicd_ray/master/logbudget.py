"""What one run may store of its steps' logs, pure: a budget per run (CICD_RAY_LOG_RUN_MAX_BYTES)
on top of each attempt's cap (CICD_RAY_LOG_CAP_BYTES), so that 5,000 steps of 21 attempts each
cannot fill the store with half a tebibyte. The master counts what it stores, live chunks and
the tails outcomes carry; past the budget each attempt gets one line saying so, then nothing.
The counts are the master's memory: a restarted master counts a run's logs afresh.
"""

from __future__ import annotations

from cicd_ray.master.commit import Observer
from cicd_ray.records import Changes


def budget_marker(limit: int) -> bytes:
    return (
        f"\n[cicd-ray] log dropped: this run's logs reached {limit} bytes "
        "(CICD_RAY_LOG_RUN_MAX_BYTES); the rest of this attempt's output is not kept\n"
    ).encode()


class LogBudget(Observer):
    """What each active run has stored of its logs; it filters every batch's log chunks."""

    def __init__(self, run_max_bytes: int) -> None:
        self.run_max_bytes = run_max_bytes
        self._used: dict[str, int] = {}  # by run id
        self._told: set[str] = set()  # attempts whose log says the budget ran out

    def admit(self, attempt_id: str, data: bytes) -> bytes:
        """What of `data` (a chunk of an attempt's log) is stored: all of it while the run
        is within its budget; then what fits and, once per attempt, the marker; then none."""
        run_id = attempt_id.split("/", 1)[0]
        used = self._used.get(run_id, 0)
        room = self.run_max_bytes - used
        if len(data) <= room:
            self._used[run_id] = used + len(data)
            return data
        self._used[run_id] = self.run_max_bytes
        if attempt_id in self._told:
            return b""
        self._told.add(attempt_id)
        return data[: max(room, 0)] + budget_marker(self.run_max_bytes)

    def forget(self, run_id: str) -> None:
        """The run ended: nothing more of it is counted."""
        self._used.pop(run_id, None)
        self._told = {a for a in self._told if not a.startswith(f"{run_id}/")}

    def writing(self, changes: Changes, now: float) -> None:
        changes.logs = [
            (a, seq, kept) for a, seq, data in changes.logs if (kept := self.admit(a, data))
        ]

    def committed(self, changes: Changes, took_s: float, now: float) -> None:
        for run_id, run in changes.runs.items():
            if run.state.terminal:
                self.forget(run_id)
