"""Cron schedules, the pure parts and the core: slots in a time zone, the missed-slot
policies, and each slot starting exactly one run across simulated restarts (a new core on the
same store), before and after the slot's run was written."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from cicd_ray.config import Settings
from cicd_ray.master.core import MasterCore
from cicd_ray.protocol import Rejected, Submitted
from cicd_ray.records import Changes
from cicd_ray.store.memory import MemoryStore
from cicd_ray.testing.clock import ManualClock
from cicd_ray.triggers.cron import ScheduleRecord, ScheduleSpec, due, next_slot
from cicd_ray.triggers.repositories import RepoConfig, load_schedules

HOUR = 3600.0


def record(**kw) -> ScheduleRecord:
    return ScheduleRecord(
        **{"name": "n", "cron": "0 * * * *", "created_at": 0.0, "last_slot": 0.0, **kw}
    )


def test_a_slot_is_due_once_it_has_come():
    r = record()
    assert due(r, HOUR - 1) == (None, 0.0)
    assert due(r, HOUR) == (HOUR, HOUR)
    assert due(record(last_slot=HOUR), HOUR + 10) == (None, HOUR)  # fired already


def test_missed_slots_run_the_latest_once_or_are_skipped():
    down_until = 5 * HOUR + 600  # the service was down through slots 1 to 5
    assert due(record(), down_until) == (5 * HOUR, 5 * HOUR)  # latest: one run, the 5th
    assert due(record(missed="skip"), down_until) == (None, 5 * HOUR)  # skip: none
    assert due(record(missed="skip"), 5 * HOUR + 30) == (5 * HOUR, 5 * HOUR)  # on time


def test_slots_are_in_the_schedule_s_time_zone():
    berlin = ZoneInfo("Europe/Berlin")
    spec = ScheduleSpec(name="n", cron="0 2 * * *", timezone="Europe/Berlin")
    after = datetime(2026, 3, 28, 12, tzinfo=berlin).timestamp()
    first = next_slot(spec, after)
    # 02:00 does not exist on the day clocks go forward: the slot is at 03:00 that day.
    assert datetime.fromtimestamp(first, berlin) == datetime(2026, 3, 29, 3, tzinfo=berlin)
    assert datetime.fromtimestamp(next_slot(spec, first), berlin) == datetime(
        2026, 3, 30, 2, tzinfo=berlin
    )
    assert next_slot(ScheduleSpec(name="s", cron="* * * * * */10"), 0.0) == 10.0  # seconds


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("cron", "61 * * * *", "is not a cron expression"),
        ("cron", "* * *", "is not a cron expression"),
        ("timezone", "Mars/Olympus", "is not a time zone"),
        ("name", "Nightly Build", "should match pattern"),
        ("missed", "twice", "'latest' or 'skip'"),
    ],
)
def test_a_bad_schedule_says_what_is_wrong(field, value, message):
    with pytest.raises(ValidationError, match=message):
        ScheduleSpec(**{"name": "n", "cron": "0 * * * *", field: value})


PIPELINE = {"name": "nightly", "steps": [{"name": "a", "run": "true"}]}


def fire_due(core: MasterCore) -> list:
    out = []
    for rec, slot in core.starts.due_schedules():
        out.append(core.starts.fire(rec, slot, core.starts.plan_schedule(rec, slot, rec.pipeline)))
    return out


def test_each_slot_starts_exactly_one_run_across_restarts(tmp_path):
    store, clock = MemoryStore(), ManualClock(1000.0)
    settings = Settings(home=tmp_path)
    core = MasterCore(settings, store, clock=clock)
    made = core.starts.add_schedule(
        ScheduleSpec(name="nightly", cron="* * * * *", env={"TARGET": "n"}, pipeline=PIPELINE),
        "web",
    )
    assert made["next_at"] == 1020.0
    clock.now = 1021.0
    [answer] = fire_due(core)
    assert isinstance(answer, Submitted)
    run = store.get_run(answer.run_id)
    assert (run.event, run.scheduled_for, run.project) == ("schedule", 1020.0, "web")
    assert fire_due(core) == []  # the same slot again: nothing
    # A restart after the slot's run was written: the new master does not start it again.
    core = MasterCore(settings, store, clock=clock)
    assert fire_due(core) == []
    # A restart between taking a slot and writing its run: the next master starts it once.
    clock.now = 1081.0
    assert [slot for _, slot in core.starts.due_schedules()] == [1080.0]
    core = MasterCore(settings, store, clock=clock)
    assert [store.get_run(a.run_id).scheduled_for for a in fire_due(core)] == [1080.0]
    assert fire_due(MasterCore(settings, store, clock=clock)) == []
    runs = store.list_runs(pipeline="nightly")
    assert sorted(r.scheduled_for for r in runs) == [1020.0, 1080.0]
    [listed] = core.timetable.view("web", clock.now)
    assert (listed["last_slot"], listed["last_run"], listed["next_at"]) == (
        1080.0,
        runs[0].id,
        1140.0,
    )


def test_a_slot_whose_run_cannot_start_is_written_with_why(tmp_path):
    store, clock = MemoryStore(), ManualClock(1000.0)
    core = MasterCore(Settings(home=tmp_path), store, clock=clock)
    core.starts.add_schedule(
        ScheduleSpec(name="bad", cron="* * * * *", env={"CICD_X": "1"}, pipeline=PIPELINE), "web"
    )
    clock.now = 1021.0
    [answer] = fire_due(core)
    assert isinstance(answer, Rejected)
    [listed] = core.timetable.view("web", clock.now)
    assert listed["last_slot"] == 1020.0 and "CICD_X" in listed["last_error"]
    assert fire_due(core) == []  # not tried again until the next slot


def test_schedules_made_twice_or_running_nothing_are_refused(tmp_path):
    core = MasterCore(Settings(home=tmp_path), MemoryStore(), clock=ManualClock(0.0))
    spec = ScheduleSpec(name="n", cron="* * * * *", pipeline=PIPELINE)
    assert "id" in core.starts.add_schedule(spec, "web")
    assert core.starts.add_schedule(spec, "web").problems == [
        "project web has a schedule n already"
    ]
    assert "id" in core.starts.add_schedule(spec, "ops")  # another project's name space
    nothing = core.starts.add_schedule(ScheduleSpec(name="m", cron="* * * * *"), "web")
    assert nothing.problems == ["a schedule runs a `pipeline` or a `repository`'s pipeline file"]
    assert core.starts.delete_schedule("web", "n") and not core.starts.delete_schedule("web", "n")


def test_the_repositories_file_s_schedules_keep_their_last_slot_across_restarts(tmp_path):
    f = tmp_path / "repos.yaml"
    f.write_text("""\
repositories:
  - {name: acme/app, url: 'file:///srv/app.git', provider: github, project: web,
     webhook_secret: HOOK}
schedules:
  - {name: nightly, repository: acme/app, ref: main, cron: '0 2 * * *', missed: skip}
""")
    repos = {
        "acme/app": RepoConfig(
            name="acme/app",
            url="file:///srv/app.git",
            provider="github",
            project="web",
            webhook_secret="HOOK",
        )
    }
    settings = Settings(home=tmp_path, repos=repos, schedules=load_schedules(f, repos))
    store = MemoryStore()
    MasterCore(settings, store, clock=ManualClock(500.0))
    [s] = store.list_schedules()
    assert (s.id, s.origin, s.last_slot, s.ref, s.missed) == (
        "web/nightly",
        "file",
        500.0,
        "main",
        "skip",
    )
    MasterCore(settings, store, clock=ManualClock(9000.0))
    assert store.list_schedules()[0].last_slot == 500.0  # kept: not a new schedule
    MasterCore(settings.model_copy(update={"schedules": []}), store, clock=ManualClock(9000.0))
    assert store.list_schedules() == []  # gone from the file: gone
    f.write_text(f.read_text().replace("acme/app, ref", "acme/other, ref"))
    with pytest.raises(Exception, match="'acme/other' is not one of the repositories"):
        load_schedules(f, repos)


def test_a_repository_s_schedule_builds_the_commit_its_ref_named_at_the_slot(tmp_path):
    repos = {
        "acme/app": RepoConfig(
            name="acme/app",
            url="file:///srv/app.git",
            provider="github",
            project="web",
            webhook_secret="HOOK",
        )
    }
    settings = Settings(
        home=tmp_path,
        repos=repos,
        schedules=[
            ScheduleSpec(
                name="nightly",
                repository="acme/app",
                ref="main",
                cron="0 2 * * *",
                env={"SUITE": "full"},
            )
        ],
    )
    core = MasterCore(settings, MemoryStore(), clock=ManualClock(500.0))
    record = core.timetable.schedules["web/nightly"]
    planned = core.starts.plan_schedule(
        record, 7200.0, "name: app\nsteps:\n  - {name: t, run: 'true'}\n", "c" * 40, "main"
    )
    assert planned.problems == []
    assert (planned.commit, planned.branch, planned.repo, planned.event, planned.project) == (
        "c" * 40,
        "main",
        "acme/app",
        "schedule",
        "web",
    )
    assert planned.spec.source.git == "file:///srv/app.git"
    assert planned.steps[0].env["SUITE"] == "full"
    broken = core.starts.plan_schedule(
        record, 7200.0, "name: app\nsteps: [{name: t, tiemout: 1}]\n", "c" * 40, "main"
    )
    assert broken.problems[0].startswith(".cicd-ray.yaml: steps[0] (t)")


def test_a_never_firing_cron_is_refused_and_a_stored_one_never_stops_the_master(tmp_path):
    """Issue 24, item 4: `0 0 30 2 *` is valid to croniter and has no slot. Made through the
    API it is refused; stored (by an earlier version) it is marked with its error and
    skipped on every tick and restart, and the other schedules go on firing."""
    store, clock = MemoryStore(), ManualClock(1000.0)
    settings = Settings(home=tmp_path)
    core = MasterCore(settings, store, clock=clock)
    never = ScheduleSpec(name="never", cron="0 0 30 2 *", pipeline=PIPELINE)
    answer = core.starts.add_schedule(never, "web")
    assert isinstance(answer, Rejected) and "never fires" in answer.problems[0]
    store.save(
        Changes(
            schedules={
                "web/never": ScheduleRecord(
                    **never.model_dump(), project="web", created_at=0.0, last_slot=0.0
                )
            }
        )
    )
    core = MasterCore(settings, store, clock=clock)  # a restart takes it up from the store
    core.starts.add_schedule(ScheduleSpec(name="fine", cron="* * * * *", pipeline=PIPELINE), "web")
    clock.now = 1081.0
    [answer] = fire_due(core)
    assert isinstance(answer, Submitted)
    assert store.get_run(answer.run_id).pipeline == "nightly"
    broken = next(s for s in store.list_schedules() if s.name == "never")
    assert "next slot cannot be computed" in broken.last_error
    views = {v["name"]: v for v in core.timetable.view("web", clock.now)}
    assert views["never"]["next_at"] is None and views["fine"]["next_at"] == 1140.0
    assert fire_due(MasterCore(settings, store, clock=clock)) == []  # restarts keep going


def test_schedules_have_a_minimum_interval_and_a_cap_per_project(tmp_path):
    """Issue 24, item 17."""
    settings = Settings(home=tmp_path, schedule_min_interval_s=60, max_schedules_per_project=2)
    core = MasterCore(settings, MemoryStore(), clock=ManualClock(0.0))
    fast = core.starts.add_schedule(
        ScheduleSpec(name="fast", cron="* * * * * *", pipeline=PIPELINE), "web"
    )
    assert fast.problems == [
        "cron: '* * * * * *' fires every 1 s; schedules may fire at most "
        "every 60 s (CICD_RAY_SCHEDULE_MIN_INTERVAL_S)"
    ]
    for name in ("a", "b"):
        assert "id" in core.starts.add_schedule(
            ScheduleSpec(name=name, cron="*/5 * * * *", pipeline=PIPELINE), "web"
        )
    third = core.starts.add_schedule(
        ScheduleSpec(name="c", cron="0 * * * *", pipeline=PIPELINE), "web"
    )
    assert third.problems == [
        "project web has 2 schedules, the most it may have "
        "(CICD_RAY_MAX_SCHEDULES): delete one first"
    ]
    assert "id" in core.starts.add_schedule(
        ScheduleSpec(name="c", cron="0 * * * *", pipeline=PIPELINE), "ops"
    )
