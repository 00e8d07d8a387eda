"""An in-memory store: the same contract as SQLite and Redis, for tests and the inline driver.

Records are kept as their JSON, as a real store keeps them, so a caller that changes a record
after saving it does not change what is stored. `save` builds the whole batch before any of it
is applied: all of it or none.
"""

from __future__ import annotations

import threading

from cicd_ray.records import (
    OPEN_DELIVERY,
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


class MemoryStore:
    """The store in this process's memory: the same contract as SQLite and Redis, for tests and
    the inline driver (records kept as JSON, so nothing is shared by reference)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, str] = {}
        self._steps: dict[str, dict[str, str]] = {}
        self._attempts: dict[str, str] = {}
        self._workers: dict[str, str] = {}
        self._logs: dict[str, dict[int, bytes]] = {}
        self._keys: dict[str, str] = {}
        self._sources: dict[str, tuple[bytes, float]] = {}
        self._results: dict[str, str] = {}
        self._deliveries: dict[str, str] = {}
        self._run_secrets: dict[str, dict[str, str]] = {}
        self._audit: list[str] = []
        self._schedules: dict[str, str] = {}

    def save(self, changes: Changes) -> None:
        runs = {r.id: r.model_dump_json() for r in changes.runs.values()}
        steps = [(s.run_id, s.name, s.model_dump_json()) for s in changes.steps.values()]
        attempts = {a.id: a.model_dump_json() for a in changes.attempts.values()}
        workers = {w.id: w.model_dump_json() for w in changes.workers.values()}
        keys = {k: r.model_dump_json() for k, r in changes.idempotency.items()}
        results = {k: r.model_dump_json() for k, r in changes.results.items()}
        deliveries = {d.id: d.model_dump_json() for d in changes.deliveries.values()}
        audit = [a.model_dump_json() for a in changes.audit]
        schedules = {i: s.model_dump_json() for i, s in changes.schedules.items()}
        with self._lock:
            self._audit += audit
            self._schedules.update(schedules)
            for schedule_id in changes.drop_schedules:
                self._schedules.pop(schedule_id, None)
            self._results.update(results)
            self._deliveries.update(deliveries)
            self._run_secrets.update({k: dict(v.values) for k, v in changes.run_secrets.items()})
            for run_id in changes.drop_run_secrets:
                self._run_secrets.pop(run_id, None)
            self._runs.update(runs)
            for run_id, name, data in steps:
                self._steps.setdefault(run_id, {})[name] = data
            self._attempts.update(attempts)
            self._workers.update(workers)
            for attempt_id, seq, data in changes.logs:
                self._logs.setdefault(attempt_id, {}).setdefault(seq, bytes(data))
            for key, data in keys.items():
                self._keys.setdefault(key, data)

    def get_run(self, run_id: str) -> RunRecord | None:
        data = self._runs.get(run_id)
        return RunRecord.model_validate_json(data) if data else None

    def _all_runs(self) -> list[RunRecord]:
        with self._lock:
            texts = list(self._runs.values())
        return sorted((RunRecord.model_validate_json(t) for t in texts), key=lambda r: r.seq)

    def list_runs(
        self,
        state: RunState | None = None,
        pipeline: str | None = None,
        limit: int = 50,
        offset: int = 0,
        project: str | None = None,
    ) -> list[RunRecord]:
        runs = [
            r
            for r in reversed(self._all_runs())
            if (state is None or r.state is RunState(state))
            and (pipeline is None or r.pipeline == pipeline)
            and (project is None or r.project == project)
        ]
        return runs[offset : offset + limit]

    def active_runs(self) -> list[RunRecord]:
        return [r for r in self._all_runs() if not r.state.terminal]

    def get_steps(self, run_id: str) -> list[StepRecord]:
        with self._lock:
            texts = list(self._steps.get(run_id, {}).values())
        return sorted(
            (StepRecord.model_validate_json(t) for t in texts), key=lambda s: s.spec.index
        )

    def get_attempts(self, run_id: str, step: str | None = None) -> list[AttemptRecord]:
        with self._lock:
            texts = list(self._attempts.values())
        found = [
            a
            for a in map(AttemptRecord.model_validate_json, texts)
            if a.run_id == run_id and (step is None or a.step == step)
        ]
        return sorted(found, key=lambda a: (a.step, a.number))

    def list_workers(self) -> list[WorkerRecord]:
        with self._lock:
            texts = [self._workers[k] for k in sorted(self._workers)]
        return [WorkerRecord.model_validate_json(t) for t in texts]

    def append_log(self, attempt_id: str, seq: int, data: bytes) -> None:
        with self._lock:
            self._logs.setdefault(attempt_id, {}).setdefault(seq, bytes(data))

    def read_log(self, attempt_id: str, offset: int = 0) -> bytes:
        with self._lock:
            chunks = self._logs.get(attempt_id, {})
            return b"".join(chunks[s] for s in sorted(chunks))[offset:]

    def get_key(self, key: str) -> KeyRecord | None:
        data = self._keys.get(key)
        return KeyRecord.model_validate_json(data) if data else None

    def put_source(self, digest: str, data: bytes, at: float = 0.0) -> None:
        with self._lock:
            self._sources[digest] = (self._sources.get(digest, (bytes(data), at))[0], at)

    def get_source(self, digest: str) -> bytes | None:
        found = self._sources.get(digest)
        return found[0] if found else None

    def next_run_seq(self) -> int:
        return max((r.seq for r in self._all_runs()), default=0) + 1

    def list_schedules(self) -> list[ScheduleRecord]:
        with self._lock:
            texts = [self._schedules[k] for k in sorted(self._schedules)]
        return [ScheduleRecord.model_validate_json(t) for t in texts]

    def list_audit(self, limit: int = 100, offset: int = 0) -> list[AuditRecord]:
        with self._lock:
            texts = self._audit[::-1][offset : offset + limit]
        return [AuditRecord.model_validate_json(t) for t in texts]

    def get_run_secrets(self, run_id: str) -> dict[str, str]:
        return dict(self._run_secrets.get(run_id, {}))

    def get_deliveries(self, run_id: str | None = None) -> list[DeliveryRecord]:
        with self._lock:
            found = [DeliveryRecord.model_validate_json(t) for t in self._deliveries.values()]
        return sorted(
            (
                d
                for d in found
                if d.run_id == run_id or (run_id is None and d.state in OPEN_DELIVERY)
            ),
            key=lambda d: d.id,
        )

    def get_result(self, key: str) -> ResultRecord | None:
        data = self._results.get(key)
        return ResultRecord.model_validate_json(data) if data else None

    def artifact_digests(self) -> set[str]:
        with self._lock:
            steps = [t for run in self._steps.values() for t in run.values()]
            results = list(self._results.values())
            runs = [RunRecord.model_validate_json(t) for t in self._runs.values()]
        return (
            {f.digest for t in steps for f in StepRecord.model_validate_json(t).artifacts}
            | {f.digest for t in results for f in ResultRecord.model_validate_json(t).artifacts}
            | {r.source_digest for r in runs if r.source_digest}
        )

    def expired_runs(self, before: float, limit: int = 500) -> list[RunRecord]:
        return [
            r
            for r in self._all_runs()
            if r.state.terminal
            and (r.finished_at if r.finished_at is not None else r.created_at) < before
        ][:limit]

    def delete_runs(self, run_ids: list[str]) -> None:
        with self._lock:
            for run_id in run_ids:
                gone = [
                    i
                    for i, t in self._attempts.items()
                    if AttemptRecord.model_validate_json(t).run_id == run_id
                ]
                for attempt_id in gone:
                    self._attempts.pop(attempt_id)
                    self._logs.pop(attempt_id, None)
                self._steps.pop(run_id, None)
                self._runs.pop(run_id, None)
                for key in [k for k in self._deliveries if k.startswith(f"{run_id}/")]:
                    self._deliveries.pop(key)
                self._run_secrets.pop(run_id, None)
            gone_results = [
                k
                for k, t in self._results.items()
                if ResultRecord.model_validate_json(t).origin.run_id in run_ids
            ]
            for key in gone_results:
                self._results.pop(key)

    def list_sources(self) -> list[tuple[str, float]]:
        return [(d, at) for d, (_, at) in self._sources.items()]

    def delete_sources(self, digests: list[str]) -> None:
        with self._lock:
            for digest in digests:
                self._sources.pop(digest, None)

    def old_keys(self, before: float) -> list[str]:
        return [k for k, t in self._keys.items() if KeyRecord.model_validate_json(t).at < before]

    def delete_keys(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._keys.pop(key, None)

    def delete_workers(self, worker_ids: list[str]) -> None:
        with self._lock:
            for worker_id in worker_ids:
                self._workers.pop(worker_id, None)

    def close(self) -> None:
        pass
