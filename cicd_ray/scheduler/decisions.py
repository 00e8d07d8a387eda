"""What the scheduler decided: records to write, then work to hand out, kill, start or stop.

The master writes `changes` to the store before it carries out any of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cicd_ray.records import (
    AttemptRecord,
    Changes,
    RunRecord,
    StepRecord,
    StepTask,
    WorkerRecord,
)


@dataclass
class Kill:
    attempt_id: str
    worker_id: str


@dataclass
class Decisions:
    changes: Changes = field(default_factory=Changes)
    dispatch: list[tuple[str, StepTask]] = field(default_factory=list)  # (worker_id, task)
    kill: list[Kill] = field(default_factory=list)
    start_workers: list[WorkerRecord] = field(default_factory=list)
    stop_workers: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.changes or self.dispatch or self.kill or self.start_workers
                    or self.stop_workers)

    def record(self, record: RunRecord | StepRecord | AttemptRecord | WorkerRecord) -> None:
        self.changes.add(record)

    def drain(self) -> Decisions:
        """What was collected so far, leaving this batch empty (the parts keep writing to it)."""
        out = Decisions(self.changes, self.dispatch, self.kill, self.start_workers,
                        self.stop_workers)
        self.changes, self.dispatch, self.kill = Changes(), [], []
        self.start_workers, self.stop_workers = [], []
        return out
