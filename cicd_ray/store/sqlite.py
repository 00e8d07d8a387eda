"""The embedded default store: one SQLite file in WAL mode.

Records are kept as JSON next to the few columns the queries filter on. The master is the only
writer; the CLI reads the same file (WAL lets readers in while the master writes).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

from cicd_ray.errors import StoreError
from cicd_ray.ownership import private_folder
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
from cicd_ray.states import RUN_TERMINAL, RunState

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, pipeline TEXT NOT NULL, state TEXT NOT NULL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS runs_seq ON runs (seq);
CREATE INDEX IF NOT EXISTS runs_state ON runs (state);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL, name TEXT NOT NULL, idx INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (run_id, name));
CREATE TABLE IF NOT EXISTS attempts (
    id TEXT PRIMARY KEY, run_id TEXT NOT NULL, step TEXT NOT NULL, number INTEGER NOT NULL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS attempts_run ON attempts (run_id, step, number);
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS logs (
    attempt_id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (attempt_id, seq));
CREATE TABLE IF NOT EXISTS sources (digest TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, run_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, at REAL NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS keys_at ON keys (at);
CREATE TABLE IF NOT EXISTS source_times (digest TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, run_id TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS results_run ON results (run_id);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY, run_id TEXT NOT NULL, open INTEGER NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS deliveries_run ON deliveries (run_id);
CREATE INDEX IF NOT EXISTS deliveries_open ON deliveries (open);
CREATE TABLE IF NOT EXISTS run_secrets (run_id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS schedules (id TEXT PRIMARY KEY, data TEXT NOT NULL);
"""


class SqliteStore:
    """The embedded store: one SQLite file in WAL mode; a batch is one transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            # A new home is the owner's alone, and so is the file: it holds every run's record.
            private_folder(self.path.parent)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self._db = sqlite3.connect(
                self.path, timeout=30, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process crash; an OS crash may lose the
            # last commits but never corrupts the file.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the SQLite store at {self.path}: {e}") from None
        self._lock = threading.Lock()

    def _write(self, statements: list[tuple[str, list[tuple]]]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for sql, rows in statements:
                    if rows:
                        self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StoreError(f"write to {self.path} failed: {e}") from None

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"read from {self.path} failed: {e}") from None

    def save(self, changes: Changes) -> None:
        self._write(batch_statements(changes))

    def get_run(self, run_id: str) -> RunRecord | None:
        rows = self._read("SELECT data FROM runs WHERE id = ?", (run_id,))
        return RunRecord.model_validate_json(rows[0][0]) if rows else None

    def list_runs(
        self,
        state: RunState | None = None,
        pipeline: str | None = None,
        limit: int = 50,
        offset: int = 0,
        project: str | None = None,
    ) -> list[RunRecord]:
        where, args = [], []
        if project is not None:  # (records from before projects have none: the default)
            where.append("COALESCE(json_extract(data, '$.project'), 'default') = ?")
            args.append(project)
        if state is not None:
            where.append("state = ?")
            args.append(RunState(state).value)
        if pipeline is not None:
            where.append("pipeline = ?")
            args.append(pipeline)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._read(
            f"SELECT data FROM runs {clause} ORDER BY seq DESC LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
        return [RunRecord.model_validate_json(r[0]) for r in rows]

    def active_runs(self) -> list[RunRecord]:
        done = ",".join("?" * len(RUN_TERMINAL))
        rows = self._read(
            f"SELECT data FROM runs WHERE state NOT IN ({done}) ORDER BY seq",
            tuple(s.value for s in RUN_TERMINAL),
        )
        return [RunRecord.model_validate_json(r[0]) for r in rows]

    def get_steps(self, run_id: str) -> list[StepRecord]:
        rows = self._read("SELECT data FROM steps WHERE run_id = ? ORDER BY idx", (run_id,))
        return [StepRecord.model_validate_json(r[0]) for r in rows]

    def get_attempts(self, run_id: str, step: str | None = None) -> list[AttemptRecord]:
        if step is None:
            rows = self._read(
                "SELECT data FROM attempts WHERE run_id = ? ORDER BY step, number", (run_id,)
            )
        else:
            rows = self._read(
                "SELECT data FROM attempts WHERE run_id = ? AND step = ? ORDER BY number",
                (run_id, step),
            )
        return [AttemptRecord.model_validate_json(r[0]) for r in rows]

    def list_workers(self) -> list[WorkerRecord]:
        rows = self._read("SELECT data FROM workers ORDER BY id")
        return [WorkerRecord.model_validate_json(r[0]) for r in rows]

    def append_log(self, attempt_id: str, seq: int, data: bytes) -> None:
        self._write(
            [("INSERT OR IGNORE INTO logs VALUES (?, ?, ?)", [(attempt_id, seq, bytes(data))])]
        )

    def read_log(self, attempt_id: str, offset: int = 0) -> bytes:
        rows = self._read("SELECT data FROM logs WHERE attempt_id = ? ORDER BY seq", (attempt_id,))
        return b"".join(r[0] for r in rows)[offset:]

    def get_key(self, key: str) -> KeyRecord | None:
        rows = self._read("SELECT data FROM keys WHERE key = ?", (key,))
        if rows:
            return KeyRecord.model_validate_json(rows[0][0])
        # Kept by an earlier version, before the request's digest was.
        rows = self._read("SELECT run_id FROM idempotency WHERE key = ?", (key,))
        return KeyRecord(run_id=rows[0][0]) if rows else None

    def put_source(self, digest: str, data: bytes, at: float = 0.0) -> None:
        self._write(
            [
                ("INSERT OR IGNORE INTO sources VALUES (?, ?)", [(digest, bytes(data))]),
                ("INSERT OR REPLACE INTO source_times VALUES (?, ?)", [(digest, at)]),
            ]
        )

    def get_source(self, digest: str) -> bytes | None:
        rows = self._read("SELECT data FROM sources WHERE digest = ?", (digest,))
        return bytes(rows[0][0]) if rows else None

    def next_run_seq(self) -> int:
        rows = self._read("SELECT COALESCE(MAX(seq), 0) FROM runs")
        return int(rows[0][0]) + 1

    def list_schedules(self) -> list[ScheduleRecord]:
        rows = self._read("SELECT data FROM schedules ORDER BY id")
        return [ScheduleRecord.model_validate_json(r[0]) for r in rows]

    def list_audit(self, limit: int = 100, offset: int = 0) -> list[AuditRecord]:
        rows = self._read(
            "SELECT data FROM audit ORDER BY seq DESC LIMIT ? OFFSET ?", (limit, offset)
        )
        return [AuditRecord.model_validate_json(r[0]) for r in rows]

    def get_run_secrets(self, run_id: str) -> dict[str, str]:
        rows = self._read("SELECT data FROM run_secrets WHERE run_id = ?", (run_id,))
        return json.loads(rows[0][0]) if rows else {}

    def get_deliveries(self, run_id: str | None = None) -> list[DeliveryRecord]:
        rows = (
            self._read("SELECT data FROM deliveries WHERE run_id = ? ORDER BY id", (run_id,))
            if run_id
            else self._read("SELECT data FROM deliveries WHERE open = 1")
        )
        return [DeliveryRecord.model_validate_json(r[0]) for r in rows]

    def get_result(self, key: str) -> ResultRecord | None:
        rows = self._read("SELECT data FROM results WHERE key = ?", (key,))
        return ResultRecord.model_validate_json(rows[0][0]) if rows else None

    def artifact_digests(self) -> set[str]:
        rows = self._read(
            "SELECT data FROM steps WHERE data LIKE '%\"digest\"%' "
            "UNION ALL SELECT data FROM results"
        )
        kept = {f["digest"] for (data,) in rows for f in json.loads(data).get("artifacts", [])}
        runs = self._read('SELECT data FROM runs WHERE data LIKE \'%"source_digest":"%\'')
        return kept | {json.loads(data)["source_digest"] for (data,) in runs}

    def expired_runs(self, before: float, limit: int = 500) -> list[RunRecord]:
        done = ",".join("?" * len(RUN_TERMINAL))
        rows = self._read(
            f"SELECT data FROM runs WHERE state IN ({done}) AND "
            "COALESCE(json_extract(data, '$.finished_at'), json_extract(data, '$.created_at')) "
            "< ? ORDER BY seq LIMIT ?",
            (*(s.value for s in RUN_TERMINAL), before, limit),
        )
        return [RunRecord.model_validate_json(r[0]) for r in rows]

    def delete_runs(self, run_ids: list[str]) -> None:
        ids = [(i,) for i in run_ids]
        self._write(
            [
                (
                    "DELETE FROM logs WHERE attempt_id IN (SELECT id FROM attempts WHERE "
                    "run_id = ?)",
                    ids,
                ),
                ("DELETE FROM attempts WHERE run_id = ?", ids),
                ("DELETE FROM steps WHERE run_id = ?", ids),
                ("DELETE FROM results WHERE run_id = ?", ids),
                ("DELETE FROM deliveries WHERE run_id = ?", ids),
                ("DELETE FROM run_secrets WHERE run_id = ?", ids),
                ("DELETE FROM runs WHERE id = ?", ids),
            ]
        )

    def list_sources(self) -> list[tuple[str, float]]:
        rows = self._read(
            "SELECT s.digest, COALESCE(t.at, 0) FROM sources s "
            "LEFT JOIN source_times t ON t.digest = s.digest"
        )
        return [(r[0], float(r[1])) for r in rows]

    def delete_sources(self, digests: list[str]) -> None:
        rows = [(d,) for d in digests]
        self._write(
            [
                ("DELETE FROM sources WHERE digest = ?", rows),
                ("DELETE FROM source_times WHERE digest = ?", rows),
            ]
        )

    def old_keys(self, before: float) -> list[str]:
        rows = self._read("SELECT key FROM keys WHERE at < ?", (before,))
        # Keys kept by an earlier version have no time: they are old.
        return [r[0] for r in rows] + [r[0] for r in self._read("SELECT key FROM idempotency")]

    def delete_keys(self, keys: list[str]) -> None:
        rows = [(k,) for k in keys]
        self._write(
            [
                ("DELETE FROM keys WHERE key = ?", rows),
                ("DELETE FROM idempotency WHERE key = ?", rows),
            ]
        )

    def delete_workers(self, worker_ids: list[str]) -> None:
        self._write([("DELETE FROM workers WHERE id = ?", [(i,) for i in worker_ids])])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def batch_statements(changes: Changes) -> list[tuple[str, list[tuple]]]:
    """The statements (with their rows) that write a batch, in one transaction."""
    return [
        (
            "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?)",
            [
                (r.id, r.seq, r.pipeline, r.state.value, r.model_dump_json())
                for r in changes.runs.values()
            ],
        ),
        (
            "INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?)",
            [(s.run_id, s.name, s.spec.index, s.model_dump_json()) for s in changes.steps.values()],
        ),
        (
            "INSERT OR REPLACE INTO attempts VALUES (?, ?, ?, ?, ?)",
            [
                (a.id, a.run_id, a.step, a.number, a.model_dump_json())
                for a in changes.attempts.values()
            ],
        ),
        (
            "INSERT OR REPLACE INTO workers VALUES (?, ?)",
            [(w.id, w.model_dump_json()) for w in changes.workers.values()],
        ),
        ("INSERT OR IGNORE INTO logs VALUES (?, ?, ?)", changes.logs),
        (
            "INSERT OR IGNORE INTO keys VALUES (?, ?, ?)",
            [(k, r.at, r.model_dump_json()) for k, r in changes.idempotency.items()],
        ),
        (
            "INSERT OR REPLACE INTO results VALUES (?, ?, ?)",
            [(k, r.origin.run_id, r.model_dump_json()) for k, r in changes.results.items()],
        ),
        (
            "INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, ?)",
            [
                (d.id, d.run_id, int(d.state in OPEN_DELIVERY), d.model_dump_json())
                for d in changes.deliveries.values()
            ],
        ),
        (
            "INSERT OR REPLACE INTO run_secrets VALUES (?, ?)",
            [(run_id, json.dumps(s.values)) for run_id, s in changes.run_secrets.items()],
        ),
        (
            "DELETE FROM run_secrets WHERE run_id = ?",
            [(run_id,) for run_id in changes.drop_run_secrets],
        ),
        (
            "INSERT INTO audit (data) VALUES (?)",
            [(a.model_dump_json(),) for a in changes.audit],
        ),
        (
            "INSERT OR REPLACE INTO schedules VALUES (?, ?)",
            [(i, s.model_dump_json()) for i, s in changes.schedules.items()],
        ),
        ("DELETE FROM schedules WHERE id = ?", [(i,) for i in changes.drop_schedules]),
    ]
