"""What the scheduler decided: records to write, then work to hand out, kill, start or stop.

The master writes `changes` to the store before it carries out any of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cicd_ray.protocol import StepTask
from cicd_ray.records import AttemptRecord, Changes, RunRecord, StepRecord, WorkerRecord


@dataclass
class Kill:
    attempt_id: str
    worker_id: str


@dataclass
class Effects:
    """What committed decisions ask the master's shell to do, in this order."""

    start_workers: list[WorkerRecord] = field(default_factory=list)
    stop_workers: list[str] = field(default_factory=list)
    dispatch: list[tuple[str, StepTask]] = field(default_factory=list)  # (worker_id, task)
    kill: list[Kill] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.start_workers or self.stop_workers or self.dispatch or self.kill)

    def extend(self, other: Effects) -> None:
        self.start_workers += other.start_workers
        self.stop_workers += other.stop_workers
        self.dispatch += other.dispatch
        self.kill += other.kill


@dataclass
class Decisions(Effects):
    """The effects, with the records to write before any of them is carried out."""

    changes: Changes = field(default_factory=Changes)
    ended_runs: list[RunRecord] = field(default_factory=list)  # runs that ended in this batch

    def __bool__(self) -> bool:
        return bool(self.changes) or super().__bool__()

    def record(self, record: RunRecord | StepRecord | AttemptRecord | WorkerRecord) -> None:
        self.changes.add(record)

    def effects(self) -> Effects:
        return Effects(self.start_workers, self.stop_workers, self.dispatch, self.kill)

    def drain(self) -> Decisions:
        """What was collected so far, leaving this batch empty (the parts keep writing to it)."""
        out = Decisions(changes=self.changes, ended_runs=self.ended_runs)
        out.extend(self)
        self.changes, self.ended_runs = Changes(), []
        self.start_workers, self.stop_workers, self.dispatch, self.kill = [], [], [], []
        return out
