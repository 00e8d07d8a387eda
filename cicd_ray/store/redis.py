"""The highly available store: Redis (with AOF for durability), under its own key prefix.

Keys, with the default prefix `cicd:`:
  run:{id}             the run record (JSON)
  runs                 sorted set of run ids by sequence number
  runs:active          sorted set of the runs not yet in a terminal state
  steps:{run}          hash step name -> record;  attempts:{run}  hash attempt id -> record
  workers              hash worker id -> record
  log:{attempt}        hash chunk seq -> bytes
  source:{digest}      a source archive;  idem:{key}  the run of an Idempotency-Key

`save` writes a whole batch in one MULTI/EXEC transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

import redis
from pydantic import BaseModel

from cicd_ray.errors import StoreError
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
from cicd_ray.store.base import KEY_TTL_S

M = TypeVar("M", bound=BaseModel)
PAGE = 200


class RedisStore:
    """The highly available store: a batch is one MULTI transaction; runs are indexed by sequence
    and by whether they are active."""

    def __init__(self, url: str, prefix: str = "cicd:") -> None:
        self.url = url
        self.prefix = prefix
        try:
            self._r = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)
            self._r.ping()
        except (redis.RedisError, ValueError) as e:
            raise StoreError(f"cannot reach the Redis store at {_safe(url)}: {e}") from None

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _do(self, fn):
        try:
            return fn()
        except redis.RedisError as e:
            raise StoreError(f"Redis store at {_safe(self.url)}: {e}") from None

    def save(self, changes: Changes) -> None:
        def write():
            pipe = self._r.pipeline(transaction=True)
            queue_batch(pipe, self._k, changes)
            pipe.execute()

        self._do(write)

    def _runs(self, ids: list[bytes]) -> list[RunRecord]:
        if not ids:
            return []
        raw = self._do(lambda: self._r.mget([self._k("run", i.decode()) for i in ids]))
        return [RunRecord.model_validate_json(r) for r in raw if r is not None]

    def get_run(self, run_id: str) -> RunRecord | None:
        raw = self._do(lambda: self._r.get(self._k("run", run_id)))
        return RunRecord.model_validate_json(raw) if raw else None

    def list_runs(
        self,
        state: RunState | None = None,
        pipeline: str | None = None,
        limit: int = 50,
        offset: int = 0,
        project: str | None = None,
    ) -> list[RunRecord]:
        # Newest first, filtered page by page (the filters are not indexed).
        wanted = RunState(state) if state is not None else None
        out: list[RunRecord] = []
        skipped = 0
        start = 0
        while len(out) < limit:
            ids = self._do(lambda s=start: self._r.zrevrange(self._k("runs"), s, s + PAGE - 1))
            if not ids:
                break
            for run in self._runs(ids):
                if (
                    (wanted is None or run.state is wanted)
                    and (pipeline is None or run.pipeline == pipeline)
                    and (project is None or run.project == project)
                ):
                    if skipped < offset:
                        skipped += 1
                    elif len(out) < limit:
                        out.append(run)
            start += PAGE
        return out

    def active_runs(self) -> list[RunRecord]:
        return self._runs(self._do(lambda: self._r.zrange(self._k("runs", "active"), 0, -1)))

    def _hash(self, key: str, model: type[M]) -> list[M]:
        raw = self._do(lambda: self._r.hvals(key))
        return [model.model_validate_json(v) for v in raw]

    def get_steps(self, run_id: str) -> list[StepRecord]:
        return sorted(self._hash(self._k("steps", run_id), StepRecord), key=lambda s: s.spec.index)

    def get_attempts(self, run_id: str, step: str | None = None) -> list[AttemptRecord]:
        attempts = self._hash(self._k("attempts", run_id), AttemptRecord)
        if step is not None:
            attempts = [a for a in attempts if a.step == step]
        return sorted(attempts, key=lambda a: (a.step, a.number))

    def list_workers(self) -> list[WorkerRecord]:
        return sorted(self._hash(self._k("workers"), WorkerRecord), key=lambda w: w.id)

    def append_log(self, attempt_id: str, seq: int, data: bytes) -> None:
        self._do(lambda: self._r.hsetnx(self._k("log", attempt_id), str(seq), bytes(data)))

    def read_log(self, attempt_id: str, offset: int = 0) -> bytes:
        chunks = self._do(lambda: self._r.hgetall(self._k("log", attempt_id)))
        return b"".join(chunks[k] for k in sorted(chunks, key=int))[offset:]

    def get_key(self, key: str) -> KeyRecord | None:
        raw = self._do(lambda: self._r.get(self._k("idem", key)))
        if not raw:
            return None
        if raw.startswith(b"{"):
            return KeyRecord.model_validate_json(raw)
        return KeyRecord(run_id=raw.decode())  # kept by an earlier version: the run id alone

    def put_source(self, digest: str, data: bytes, at: float = 0.0) -> None:
        def write():
            pipe = self._r.pipeline(transaction=True)
            pipe.setnx(self._k("source", digest), bytes(data))
            pipe.zadd(self._k("sources"), {digest: at})
            pipe.execute()

        self._do(write)

    def get_source(self, digest: str) -> bytes | None:
        return self._do(lambda: self._r.get(self._k("source", digest)))

    def next_run_seq(self) -> int:
        top = self._do(lambda: self._r.zrevrange(self._k("runs"), 0, 0, withscores=True))
        return int(top[0][1]) + 1 if top else 1

    def list_schedules(self) -> list[ScheduleRecord]:
        return sorted(self._hash(self._k("schedules"), ScheduleRecord), key=lambda s: s.id)

    def list_audit(self, limit: int = 100, offset: int = 0) -> list[AuditRecord]:
        raw = self._do(lambda: self._r.lrange(self._k("audit"), offset, offset + limit - 1))
        return [AuditRecord.model_validate_json(r) for r in raw]

    def get_run_secrets(self, run_id: str) -> dict[str, str]:
        raw = self._do(lambda: self._r.get(self._k("run_secrets", run_id)))
        return json.loads(raw) if raw else {}

    def get_deliveries(self, run_id: str | None = None) -> list[DeliveryRecord]:
        def read() -> list[DeliveryRecord]:
            runs = (
                [run_id]
                if run_id
                else [r.decode() for r in self._r.smembers(self._k("deliveries", "open"))]
            )
            out = []
            for rid in runs:
                found = [
                    DeliveryRecord.model_validate_json(v)
                    for v in self._r.hvals(self._k("deliveries", rid))
                ]
                if not run_id and not any(d.state in OPEN_DELIVERY for d in found):
                    self._r.srem(self._k("deliveries", "open"), rid)  # all done: tidy the index
                out += sorted(found, key=lambda d: d.id)
            return out if run_id else [d for d in out if d.state in OPEN_DELIVERY]

        return self._do(read)

    def get_result(self, key: str) -> ResultRecord | None:
        raw = self._do(lambda: self._r.hget(self._k("results"), key))
        return ResultRecord.model_validate_json(raw) if raw else None

    def artifact_digests(self) -> set[str]:
        def read() -> list[bytes]:
            out = list(self._r.hvals(self._k("results")))
            for key in self._r.scan_iter(match=self._k("steps", "*"), count=500):
                out += self._r.hvals(key)
            ids = self._r.zrange(self._k("runs"), 0, -1)
            for start in range(0, len(ids), 500):
                keys = [self._k("run", i.decode()) for i in ids[start : start + 500]]
                out += [data for data in self._r.mget(keys) if data]
            return out

        records = [json.loads(data) for data in self._do(read)]
        return {f["digest"] for r in records for f in r.get("artifacts", [])} | {
            r["source_digest"] for r in records if r.get("source_digest")
        }

    def expired_runs(self, before: float, limit: int = 500) -> list[RunRecord]:
        out: list[RunRecord] = []
        start = 0
        while len(out) < limit:  # oldest first, a page at a time
            ids = self._do(lambda s=start: self._r.zrange(self._k("runs"), s, s + PAGE - 1))
            if not ids:
                break
            for run in self._runs(ids):
                if run.created_at >= before:
                    return out  # runs are in submission order: none after this one is old
                if run.state.terminal and (run.finished_at or run.created_at) < before:
                    out.append(run)
                    if len(out) == limit:
                        break
            start += PAGE
        return out

    def delete_runs(self, run_ids: list[str]) -> None:
        def write():
            attempts, results = {}, {}
            for run_id in run_ids:
                attempts[run_id] = self._r.hkeys(self._k("attempts", run_id))
                results[run_id] = self._r.smembers(self._k("results", run_id))
            pipe = self._r.pipeline(transaction=True)
            for run_id in run_ids:
                if results[run_id]:
                    pipe.hdel(self._k("results"), *results[run_id])
                pipe.delete(self._k("results", run_id))
                for attempt_id in attempts[run_id]:
                    pipe.delete(self._k("log", attempt_id.decode()))
                pipe.delete(
                    self._k("run", run_id),
                    self._k("steps", run_id),
                    self._k("attempts", run_id),
                    self._k("deliveries", run_id),
                    self._k("run_secrets", run_id),
                )
                pipe.srem(self._k("deliveries", "open"), run_id)
                pipe.zrem(self._k("runs"), run_id)
                pipe.zrem(self._k("runs", "active"), run_id)
            pipe.execute()

        self._do(write)

    def list_sources(self) -> list[tuple[str, float]]:
        timed = dict(self._do(lambda: self._r.zrange(self._k("sources"), 0, -1, withscores=True)))
        out = [(d.decode(), float(at)) for d, at in timed.items()]
        # Archives stored before their times were kept.
        prefix = self._k("source", "")
        for key in self._do(lambda: list(self._r.scan_iter(match=prefix + "*", count=500))):
            digest = key.decode()[len(prefix) :]
            if digest.encode() not in timed:
                out.append((digest, 0.0))
        return out

    def delete_sources(self, digests: list[str]) -> None:
        if digests:
            self._do(
                lambda: (
                    self._r.delete(*[self._k("source", d) for d in digests]),
                    self._r.zrem(self._k("sources"), *digests),
                )
            )

    def old_keys(self, before: float) -> list[str]:
        return []  # Redis expires them itself (KEY_TTL_S)

    def delete_keys(self, keys: list[str]) -> None:
        if keys:
            self._do(lambda: self._r.delete(*[self._k("idem", k) for k in keys]))

    def delete_workers(self, worker_ids: list[str]) -> None:
        if worker_ids:
            self._do(lambda: self._r.hdel(self._k("workers"), *worker_ids))

    def close(self) -> None:
        self._r.close()


def _safe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def queue_batch(pipe, k: Callable[..., str], changes: Changes) -> None:
    """The commands that write a batch, queued on a MULTI pipeline (one transaction); `k`
    makes a key under the store's prefix."""
    for run in changes.runs.values():
        pipe.set(k("run", run.id), run.model_dump_json())
        pipe.zadd(k("runs"), {run.id: run.seq})
        if run.state.terminal:
            pipe.zrem(k("runs", "active"), run.id)
        else:
            pipe.zadd(k("runs", "active"), {run.id: run.seq})
    for (run_id, name), step in changes.steps.items():
        pipe.hset(k("steps", run_id), name, step.model_dump_json())
    for attempt in changes.attempts.values():
        pipe.hset(k("attempts", attempt.run_id), attempt.id, attempt.model_dump_json())
    for worker in changes.workers.values():
        pipe.hset(k("workers"), worker.id, worker.model_dump_json())
    for attempt_id, seq, data in changes.logs:
        pipe.hsetnx(k("log", attempt_id), str(seq), bytes(data))
    for key, record in changes.idempotency.items():
        pipe.set(k("idem", key), record.model_dump_json(), nx=True, ex=KEY_TTL_S)
    for key, result in changes.results.items():
        pipe.hset(k("results"), key, result.model_dump_json())
        pipe.sadd(k("results", result.origin.run_id), key)
    _queue_outbox_and_secrets(pipe, k, changes)


def _queue_outbox_and_secrets(pipe, k: Callable[..., str], changes: Changes) -> None:
    """Deliveries (with the index of runs that have open ones), runs' own secrets, audit
    records (a list, newest first)."""
    for record in changes.audit:
        pipe.lpush(k("audit"), record.model_dump_json())
    for schedule_id, schedule in changes.schedules.items():
        pipe.hset(k("schedules"), schedule_id, schedule.model_dump_json())
    for schedule_id in changes.drop_schedules:
        pipe.hdel(k("schedules"), schedule_id)
    for run_id, secrets in changes.run_secrets.items():
        pipe.set(k("run_secrets", run_id), json.dumps(secrets.values))
    for run_id in changes.drop_run_secrets:
        pipe.delete(k("run_secrets", run_id))
    for d in changes.deliveries.values():
        pipe.hset(k("deliveries", d.run_id), d.id, d.model_dump_json())
        if d.state in OPEN_DELIVERY:
            pipe.sadd(k("deliveries", "open"), d.run_id)
