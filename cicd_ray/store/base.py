"""The `Store` interface: the durable truth behind the master's in-memory view.

Every backend passes the same contract suite (tests/unit/test_store_contract.py).
"""

from __future__ import annotations

from typing import Protocol

from cicd_ray.records import (
    AttemptRecord,
    AuditRecord,
    Changes,
    DeliveryRecord,
    KeyRecord,
    ResultRecord,
    RunRecord,
    ScheduleRecord,
    StepRecord,
    WorkerRecord,
)
from cicd_ray.states import RunState

KEY_TTL_S = 24 * 3600  # an Idempotency-Key answers repeats for a day, then it is deleted


class Store(Protocol):
    """What every backend (memory, SQLite, Redis) offers: batches written atomically, reads by
    run, retention's deletes. One contract suite (tests/unit/test_store_contract.py) runs
    against each."""

    def save(self, changes: Changes) -> None:
        """Write a batch of records atomically: all of them or none."""

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def list_runs(
        self,
        state: RunState | None = None,
        pipeline: str | None = None,
        limit: int = 50,
        offset: int = 0,
        project: str | None = None,
    ) -> list[RunRecord]:
        """Newest first; `project`: only that project's."""

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

    def get_key(self, key: str) -> KeyRecord | None:
        """The run submitted with this Idempotency-Key (the first one), if any."""

    def put_source(self, digest: str, data: bytes, at: float = 0.0) -> None:
        """Store a source archive (once per digest), noting when (`at`) for retention."""

    def get_source(self, digest: str) -> bytes | None: ...

    def next_run_seq(self) -> int:
        """A number larger than that of every run stored so far."""

    def get_result(self, key: str) -> ResultRecord | None:
        """The success stored for a step key (saved with `Changes.results`), if any."""

    def get_run_secrets(self, run_id: str) -> dict[str, str]:
        """A run's own secrets (saved with `Changes.run_secrets`, dropped with
        `Changes.drop_run_secrets` or with the run); {} when it has none (any more)."""

    def get_deliveries(self, run_id: str | None = None) -> list[DeliveryRecord]:
        """A run's notifications; with no run, every one still pending or being sent."""

    def list_audit(self, limit: int = 100, offset: int = 0) -> list[AuditRecord]:
        """Audit records (saved with `Changes.audit`), newest first."""

    def list_schedules(self) -> list[ScheduleRecord]:
        """Every schedule (saved with `Changes.schedules`, deleted with `drop_schedules`),
        by id."""

    def artifact_digests(self) -> set[str]:
        """The digest of every artifact a stored step or result points at, and of every stored
        run's source snapshot (what the artifact store must keep)."""

    # --- retention (see cicd_ray.store.retention) ---

    def expired_runs(self, before: float, limit: int = 500) -> list[RunRecord]:
        """Runs in a terminal state that finished before `before`, oldest first."""

    def delete_runs(self, run_ids: list[str]) -> None:
        """Runs with their steps, attempts, logs and the results they made, in one
        transaction."""

    def list_sources(self) -> list[tuple[str, float]]:
        """(digest, stored at) of every source archive (0.0: stored before times were kept)."""

    def delete_sources(self, digests: list[str]) -> None: ...

    def old_keys(self, before: float) -> list[str]:
        """Idempotency-Keys stored before `before` (none where the backend expires them)."""

    def delete_keys(self, keys: list[str]) -> None: ...

    def delete_workers(self, worker_ids: list[str]) -> None: ...

    def close(self) -> None: ...
