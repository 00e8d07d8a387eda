"""The `Store` interface: the durable truth behind the master's in-memory view.

Every backend passes the same contract suite (tests/unit/test_store_contract.py).
"""

from __future__ import annotations

from typing import Protocol

from cicd_ray.records import AttemptRecord, Changes, RunRecord, StepRecord, WorkerRecord
from cicd_ray.states import RunState


class Store(Protocol):
    def save(self, changes: Changes) -> None:
        """Write a batch of records atomically: all of them or none."""

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def list_runs(self, state: RunState | None = None, pipeline: str | None = None,
                  limit: int = 50, offset: int = 0) -> list[RunRecord]:
        """Newest first."""

    def active_runs(self) -> list[RunRecord]:
        """Runs not yet in a terminal state, oldest first (what a restarted master resumes)."""

    def get_steps(self, run_id: str) -> list[StepRecord]:
        """In pipeline order."""

    def get_attempts(self, run_id: str, step: str | None = None) -> list[AttemptRecord]: ...

    def list_workers(self) -> list[WorkerRecord]: ...

    def append_log(self, attempt_id: str, seq: int, data: bytes) -> None:
        """Store chunk `seq` of an attempt's log; a chunk already stored is not stored twice."""

    def read_log(self, attempt_id: str, offset: int = 0) -> bytes:
        """The attempt's log from byte `offset`, chunks in `seq` order."""

    def run_for_key(self, key: str) -> str | None:
        """The run submitted with this Idempotency-Key, if any."""

    def put_source(self, digest: str, data: bytes) -> None: ...

    def get_source(self, digest: str) -> bytes | None: ...

    def next_run_seq(self) -> int:
        """A number larger than that of every run stored so far."""

    def close(self) -> None: ...
