"""The contract every Store backend passes. Add a backend to `BACKENDS` and it runs all of this."""

from __future__ import annotations

import uuid

import pytest

from cicd_ray.errors import StoreError
from cicd_ray.records import (
    AttemptRecord,
    Changes,
    KeyRecord,
    RunRecord,
    StepRecord,
    WorkerRecord,
)
from cicd_ray.spec import parse_pipeline, plan
from cicd_ray.states import RunState, StepState, WorkerState
from cicd_ray.store import SqliteStore, open_store


def sqlite_backend(request, tmp_path):
    return SqliteStore(tmp_path / "store.sqlite3")


def redis_backend(request, tmp_path):
    from cicd_ray.store.redis import RedisStore

    # A fresh prefix per test on the session's real redis-server: tests never see each other.
    url = request.getfixturevalue("redis_url")
    return RedisStore(url, prefix=f"t{uuid.uuid4().hex[:8]}:")


BACKENDS = {"sqlite": sqlite_backend, "redis": redis_backend}


@pytest.fixture(params=sorted(BACKENDS))
def store(request, tmp_path):
    s = BACKENDS[request.param](request, tmp_path)
    yield s
    s.close()


def a_run(store, run_id="r1", pipeline="p", state=RunState.QUEUED, n_steps=2):
    run = RunRecord(id=run_id, seq=store.next_run_seq(), pipeline=pipeline, created_at=1.0,
                    state=state)
    spec = parse_pipeline({"name": pipeline, "steps": [
        {"name": f"s{i}", "run": "true"} for i in range(n_steps)]})
    steps = [StepRecord(run_id=run_id, spec=p, queued_at=1.0) for p in plan(spec)]
    changes = Changes()
    changes.add(run)
    for s in steps:
        changes.add(s)
    store.save(changes)
    return run, steps


def test_run_and_steps_round_trip(store):
    run, steps = a_run(store)
    assert store.get_run("r1") == run
    assert store.get_steps("r1") == steps
    assert store.get_run("nope") is None
    assert store.get_steps("nope") == []


def test_save_replaces_records_and_later_state_wins(store):
    run, steps = a_run(store)
    run.state = RunState.RUNNING
    steps[0].state = StepState.RUNNING
    changes = Changes()
    changes.add(run)
    changes.add(steps[0])
    steps[0] = steps[0].model_copy(update={"state": StepState.SUCCEEDED})
    changes.add(steps[0])  # the same record twice in one batch: the last one is written
    store.save(changes)
    assert store.get_run("r1").state is RunState.RUNNING
    assert [s.state for s in store.get_steps("r1")] == [StepState.SUCCEEDED, StepState.QUEUED]


def test_list_runs_newest_first_filtered_and_paged(store):
    a_run(store, "r1", "alpha", RunState.SUCCEEDED)
    a_run(store, "r2", "beta", RunState.FAILED)
    a_run(store, "r3", "alpha", RunState.RUNNING)
    assert [r.id for r in store.list_runs()] == ["r3", "r2", "r1"]
    assert [r.id for r in store.list_runs(pipeline="alpha")] == ["r3", "r1"]
    assert [r.id for r in store.list_runs(state=RunState.FAILED)] == ["r2"]
    assert [r.id for r in store.list_runs(limit=1, offset=1)] == ["r2"]
    assert [r.id for r in store.active_runs()] == ["r3"]
    assert store.next_run_seq() == 4


def test_attempts_and_workers(store):
    a_run(store)
    changes = Changes()
    for n in (2, 1):
        changes.add(AttemptRecord(id=f"r1/s0/{n}", run_id="r1", step="s0", number=n,
                                  worker_id="w", queued_at=1, started_at=2))
    changes.add(AttemptRecord(id="r1/s1/1", run_id="r1", step="s1", number=1, worker_id="w",
                              queued_at=1, started_at=2, state=StepState.FAILED, exit_code=3))
    changes.add(WorkerRecord(id="w", pool="default", cpus=2, memory_mb=10, started_at=0,
                             state=WorkerState.READY))
    store.save(changes)
    assert [a.number for a in store.get_attempts("r1", "s0")] == [1, 2]
    assert [a.id for a in store.get_attempts("r1")] == ["r1/s0/1", "r1/s0/2", "r1/s1/1"]
    assert store.get_attempts("r1", "s1")[0].exit_code == 3
    assert [w.state for w in store.list_workers()] == [WorkerState.READY]


def test_logs_are_ordered_by_chunk_and_a_repeated_chunk_is_kept_once(store):
    store.append_log("a1", 2, b"world\n")
    store.append_log("a1", 1, b"hello ")
    store.append_log("a1", 1, b"hello ")
    changes = Changes()
    changes.logs.append(("a1", 3, b"bye\n"))
    store.save(changes)
    assert store.read_log("a1") == b"hello world\nbye\n"
    assert store.read_log("a1", offset=6) == b"world\nbye\n"
    assert store.read_log("other") == b""


def test_sources_are_content_addressed(store):
    store.put_source("d1", b"\x00archive")
    store.put_source("d1", b"\x00archive")
    assert store.get_source("d1") == b"\x00archive"
    assert store.get_source("d2") is None


def test_data_survives_reopening(tmp_path):
    first = SqliteStore(tmp_path / "s.sqlite3")
    a_run(first)
    first.close()
    again = open_store(f"sqlite:///{tmp_path / 's.sqlite3'}")
    assert again.get_run("r1").pipeline == "p"


def test_unknown_store_url_is_a_clear_error():
    with pytest.raises(StoreError, match="unknown scheme 'mongo'"):
        open_store("mongo://x")


def test_unreachable_redis_is_a_clear_error_without_the_password():
    with pytest.raises(StoreError, match=r"cannot reach the Redis store at redis://\*\*\*@") as e:
        open_store("redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in str(e.value)


def test_idempotency_keys_map_to_the_first_run(store):
    a_run(store)
    changes = Changes()
    changes.idempotency["key-1"] = KeyRecord(run_id="r1", request="d1", at=5.0)
    store.save(changes)
    again = Changes()
    again.idempotency["key-1"] = KeyRecord(run_id="r2", request="d2", at=6.0)
    store.save(again)
    assert store.get_key("key-1") == KeyRecord(run_id="r1", request="d1", at=5.0)
    assert store.get_key("key-2") is None
