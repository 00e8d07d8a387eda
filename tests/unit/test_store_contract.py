"""The contract every Store backend passes. Add a backend to `BACKENDS` and it runs all of this."""

from __future__ import annotations

import time
import uuid

import pytest

from cicd_ray.errors import StoreError
from cicd_ray.pipeline.graph import plan
from cicd_ray.pipeline.load import parse_pipeline
from cicd_ray.records import (
    AttemptRecord,
    AuditRecord,
    Changes,
    KeyRecord,
    RunRecord,
    StepRecord,
    WorkerRecord,
)
from cicd_ray.states import RunState, StepState, WorkerState
from cicd_ray.store import SqliteStore, open_store
from cicd_ray.store.memory import MemoryStore


def sqlite_backend(request, tmp_path):
    return SqliteStore(tmp_path / "store.sqlite3")


def redis_backend(request, tmp_path):
    from cicd_ray.store.redis import RedisStore

    # A fresh prefix per test on the session's real redis-server: tests never see each other.
    url = request.getfixturevalue("redis_url")
    return RedisStore(url, prefix=f"t{uuid.uuid4().hex[:8]}:")


def memory_backend(request, tmp_path):
    return MemoryStore()


BACKENDS = {"sqlite": sqlite_backend, "redis": redis_backend, "memory": memory_backend}


@pytest.fixture(params=sorted(BACKENDS))
def store(request, tmp_path):
    s = BACKENDS[request.param](request, tmp_path)
    yield s
    s.close()


def a_run(store, run_id="r1", pipeline="p", state=RunState.QUEUED, n_steps=2, project="default"):
    run = RunRecord(
        id=run_id,
        seq=store.next_run_seq(),
        pipeline=pipeline,
        created_at=1.0,
        state=state,
        project=project,
    )
    spec = parse_pipeline(
        {"name": pipeline, "steps": [{"name": f"s{i}", "run": "true"} for i in range(n_steps)]}
    )
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


def test_runs_listed_by_project_and_the_audit_newest_first(store):
    a_run(store, "r1", "alpha", project="web")
    a_run(store, "r2", "alpha", project="ops")
    a_run(store, "r3", "alpha", RunState.RUNNING, project="web")
    assert [r.id for r in store.list_runs(project="web")] == ["r3", "r1"]
    assert [r.id for r in store.list_runs(project="web", state=RunState.QUEUED)] == ["r1"]
    assert [r.id for r in store.list_runs(project="web", limit=1, offset=1)] == ["r1"]
    assert store.list_runs(project="nobody") == []
    for n in range(3):
        store.save(
            Changes(
                audit=[
                    AuditRecord(
                        at=n,
                        action="submit",
                        run_id=f"r{n + 1}",
                        run_project="web",
                        token_id="t",
                        project="web",
                    )
                ]
            )
        )
    assert [a.run_id for a in store.list_audit()] == ["r3", "r2", "r1"]
    assert [a.run_id for a in store.list_audit(limit=1, offset=1)] == ["r2"]


def test_schedules_are_kept_replaced_and_dropped(store):
    from cicd_ray.triggers.cron import ScheduleRecord

    def schedule(project: str, last: float) -> ScheduleRecord:
        return ScheduleRecord(
            name="nightly",
            cron="0 2 * * *",
            project=project,
            created_at=1.0,
            last_slot=last,
            pipeline={"name": "p"},
        )

    store.save(
        Changes(
            schedules={"web/nightly": schedule("web", 1.0), "ops/nightly": schedule("ops", 1.0)}
        )
    )
    store.save(Changes(schedules={"web/nightly": schedule("web", 7.0)}))
    assert [(s.id, s.last_slot) for s in store.list_schedules()] == [
        ("ops/nightly", 1.0),
        ("web/nightly", 7.0),
    ]
    assert store.list_schedules()[0].pipeline == {"name": "p"}
    store.save(Changes(drop_schedules=["ops/nightly"]))
    assert [s.id for s in store.list_schedules()] == ["web/nightly"]


def test_a_run_stored_before_projects_is_the_default_project_s(tmp_path):
    store = SqliteStore(tmp_path / "s.sqlite3")
    a_run(store, "old")
    store._write([("UPDATE runs SET data = json_remove(data, '$.project')", [()])])
    assert "project" not in store._read("SELECT data FROM runs")[0][0]
    assert [r.id for r in store.list_runs(project="default")] == ["old"]
    assert store.get_run("old").project == "default"


def test_attempts_and_workers(store):
    a_run(store)
    changes = Changes()
    for n in (2, 1):
        changes.add(
            AttemptRecord(
                id=f"r1/s0/{n}",
                run_id="r1",
                step="s0",
                number=n,
                worker_id="w",
                queued_at=1,
                started_at=2,
            )
        )
    changes.add(
        AttemptRecord(
            id="r1/s1/1",
            run_id="r1",
            step="s1",
            number=1,
            worker_id="w",
            queued_at=1,
            started_at=2,
            state=StepState.FAILED,
            exit_code=3,
        )
    )
    changes.add(
        WorkerRecord(
            id="w", pool="default", cpus=2, memory_mb=10, started_at=0, state=WorkerState.READY
        )
    )
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


def _finished_run(store, run_id: str, at: float, state=RunState.SUCCEEDED) -> None:
    run, _steps = a_run(store, run_id=run_id)
    run.state, run.created_at, run.finished_at = state, at - 1, at
    attempt = AttemptRecord(
        id=f"{run_id}/s0/1",
        run_id=run_id,
        step="s0",
        number=1,
        worker_id="w1",
        queued_at=at - 1,
        started_at=at - 1,
        state=StepState.SUCCEEDED,
    )
    changes = Changes()
    changes.add(run)
    changes.add(attempt)
    changes.logs.append((attempt.id, 1, b"log of " + run_id.encode()))
    store.save(changes)


def test_retention_deletes_old_finished_runs_with_their_logs_and_keeps_the_rest(store):
    from cicd_ray.store.retention import collect

    day = 86400.0
    _finished_run(store, "old", at=10 * day)
    _finished_run(store, "recent", at=39 * day)
    a_run(store, "active")  # queued: kept however old
    store.put_source("needed", b"x", at=1.0)
    store.put_source("unneeded", b"y", at=1.0)
    active = store.get_run("active").model_copy(
        update={"source_digest": "needed", "created_at": 0.0}
    )
    gone = WorkerRecord(
        id="gone",
        pool="p",
        cpus=1,
        memory_mb=1,
        started_at=1.0,
        state=WorkerState.STOPPED,
        stopped_at=2.0,
    )
    live = WorkerRecord(id="live", pool="p", cpus=1, memory_mb=1, started_at=1.0)
    changes = Changes()
    for record in (active, gone, live):
        changes.add(record)
    store.save(changes)
    now = 40 * day
    dry = collect(store, now, older_than_s=7 * day, dry_run=True)
    assert (dry.runs, dry.sources, dry.workers) == (1, 1, 1)
    assert store.get_run("old") is not None  # a dry run deletes nothing
    done = collect(store, now, older_than_s=7 * day)
    assert (done.runs, done.sources, done.workers) == (1, 1, 1)
    assert store.get_run("old") is None and store.get_steps("old") == []
    assert store.get_attempts("old") == [] and store.read_log("old/s0/1") == b""
    assert store.get_run("recent") is not None and store.read_log("recent/s0/1")
    assert store.get_run("active") is not None
    assert store.get_source("needed") == b"x" and store.get_source("unneeded") is None
    assert [w.id for w in store.list_workers()] == ["live"]
    assert "old" not in [r.id for r in store.list_runs()]
    assert collect(store, now, older_than_s=7 * day).as_dict() == {
        "runs": 0,
        "sources": 0,
        "keys": 0,
        "workers": 0,
        "artifacts": 0,
    }


def test_the_sqlite_file_is_the_owners_alone(tmp_path):
    import stat

    path = tmp_path / "new-home" / "cicd.sqlite3"
    SqliteStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_durations():
    from cicd_ray.errors import CicdError
    from cicd_ray.store.retention import parse_duration

    assert [parse_duration(t) for t in ("7d", "12h", "30m", "90s", "100", "1w")] == [
        7 * 86400,
        12 * 3600,
        1800,
        90,
        100,
        7 * 86400,
    ]
    with pytest.raises(CicdError, match="not a duration"):
        parse_duration("soon")


def test_what_is_stored_is_a_copy_of_the_record_saved(store):
    run, _ = a_run(store)
    run.state = RunState.FAILED  # changed in memory after the save, not saved again
    assert store.get_run("r1").state is RunState.QUEUED
    store.get_run("r1").reason = "changed by a reader"
    assert store.get_run("r1").reason == ""


def test_results_are_found_by_key_and_deleted_with_the_run_that_made_them(store):
    from cicd_ray.records import ArtifactFile, Origin, ResultRecord

    _finished_run(store, "maker", at=10.0)
    _finished_run(store, "other", at=11.0)
    kept = ArtifactFile(path="dist/app", size=3, digest="a" * 64)
    changes = Changes()
    changes.results["k1"] = ResultRecord(
        key="k1", origin=Origin(run_id="maker", step="s0", attempt=1), artifacts=[kept], at=10.0
    )
    changes.results["k2"] = ResultRecord(
        key="k2", origin=Origin(run_id="other", step="s0", attempt=1), at=11.0
    )
    step = store.get_steps("other")[0]
    step.artifacts = [ArtifactFile(path="x", size=1, digest="b" * 64)]
    changes.add(step)
    store.save(changes)
    assert store.get_result("k1").artifacts == [kept]
    assert store.get_result("k1").origin.run_id == "maker" and store.get_result("nope") is None
    assert store.artifact_digests() == {"a" * 64, "b" * 64}
    store.delete_runs(["maker"])
    assert store.get_result("k1") is None and store.get_result("k2") is not None
    assert store.artifact_digests() == {"b" * 64}


def test_a_run_s_source_snapshot_is_referenced_while_the_run_is_stored(store):
    """Snapshots live in the artifact store by digest: retention keeps those a stored run
    names, and lets go of a run's once the run is deleted."""
    _finished_run(store, "old", at=10.0)
    run = store.get_run("old")
    run.source_digest = "c" * 64
    changes = Changes()
    changes.add(run)
    store.save(changes)
    assert store.artifact_digests() == {"c" * 64}
    store.delete_runs(["old"])
    assert store.artifact_digests() == set()


def test_deliveries_are_listed_per_run_open_ones_found_and_deleted_with_their_run(store):
    from cicd_ray.records import DeliveryRecord

    _finished_run(store, "r1", at=10.0)
    _finished_run(store, "r2", at=11.0)

    def delivery(run_id, i, state):
        return DeliveryRecord(
            id=f"{run_id}/{i}",
            run_id=run_id,
            url=f"https://h/{i}",
            state=state,
            created_at=10.0,
            next_at=10.0,
        )

    changes = Changes()
    for d in (
        delivery("r1", 0, "pending"),
        delivery("r1", 1, "delivered"),
        delivery("r2", 0, "sending"),
    ):
        changes.deliveries[d.id] = d
    store.save(changes)
    assert [d.id for d in store.get_deliveries("r1")] == ["r1/0", "r1/1"]
    assert sorted(d.id for d in store.get_deliveries()) == ["r1/0", "r2/0"]
    done = Changes()
    done.deliveries["r2/0"] = delivery("r2", 0, "delivered")
    store.save(done)
    assert [d.id for d in store.get_deliveries()] == ["r1/0"]
    assert store.get_deliveries("r2")[0].state == "delivered"
    store.delete_runs(["r1"])
    assert store.get_deliveries("r1") == [] and store.get_deliveries() == []


def test_a_run_s_own_secrets_are_kept_apart_dropped_and_deleted_with_it(store):
    from cicd_ray.records import RunSecrets

    for run_id in ("r1", "r2"):
        _finished_run(store, run_id, at=10.0)
    store.save(
        Changes(
            run_secrets={
                "r1": RunSecrets(values={"A": "value-one"}),
                "r2": RunSecrets(values={"B": "value-two"}),
            }
        )
    )
    assert store.get_run_secrets("r1") == {"A": "value-one"}
    assert "value-one" not in store.get_run("r1").model_dump_json()
    store.save(Changes(drop_run_secrets=["r1"]))
    assert store.get_run_secrets("r1") == {} and store.get_run_secrets("nope") == {}
    store.delete_runs(["r2"])
    assert store.get_run_secrets("r2") == {}


def test_retention_deletes_the_artifacts_nothing_points_at_any_more(store, tmp_path):
    import io

    from cicd_ray.records import ArtifactFile
    from cicd_ray.store.blobs import ArtifactStore
    from cicd_ray.store.retention import collect

    artifacts = ArtifactStore(f"file://{tmp_path / 'artifacts'}")
    files = {}
    for name in ("old-only", "shared", "recent-only"):
        digest = artifacts.put(io.BytesIO(name.encode()))
        files[name] = ArtifactFile(path=name, size=len(name), digest=digest)
    day = 86400.0
    _finished_run(store, "old", at=10 * day)
    _finished_run(store, "recent", at=39 * day)
    changes = Changes()
    for run_id, names in (("old", ["old-only", "shared"]), ("recent", ["shared", "recent-only"])):
        step = store.get_steps(run_id)[0]
        step.artifacts = [files[n] for n in names]
        changes.add(step)
    store.save(changes)
    aside = tmp_path / "artifacts" / "blobs" / "new-0123.tmp"  # a worker died mid-write
    aside.write_bytes(b"half")
    now = time.time() + 2 * 3600  # the files are past the grace period for new ones
    done = collect(store, now, older_than_s=now - 20 * day, artifacts=artifacts)
    assert done.runs == 1 and done.artifacts == 2 and not aside.exists()
    assert set(artifacts.digests()) == {files["shared"].digest, files["recent-only"].digest}
