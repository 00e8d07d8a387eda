"""Projects in the pure policy and the core: fair share between projects in a contended pool,
the quota of running steps, the quota of queued runs, the audit, and a project's runs kept
apart in the store's reads."""

from __future__ import annotations

import pytest

from cicd_ray.config import Settings
from cicd_ray.errors import SpecError
from cicd_ray.master.core import MasterCore
from cicd_ray.pipeline.graph import plan
from cicd_ray.pipeline.load import parse_pipeline
from cicd_ray.pools import PoolConfig, ProjectConfig, load_projects
from cicd_ray.protocol import OverQuota, StepOutcome, Submitted
from cicd_ray.records import Caller, RunRecord, WorkerRecord
from cicd_ray.scheduler import Scheduler
from cicd_ray.scheduler.share import Share
from cicd_ray.states import StepState
from cicd_ray.store.memory import MemoryStore

POOL = {"default": PoolConfig(name="default", workers=1, cpus=2)}


def scheduler(share: Share) -> Scheduler:
    s = Scheduler(POOL, share=share)
    s.tick(0.0)
    for rec in s.take().start_workers:
        s.register_worker(
            WorkerRecord(id="w1", pool=rec.pool, cpus=2, memory_mb=4096, started_at=0.0), 0.0
        )
        del s.workers[rec.id]
    s.take()
    return s


def submit(
    s: Scheduler, run_id: str, project: str, steps: int, now: float = 0.0, priority: int = 0
) -> None:
    spec = parse_pipeline(
        {
            "name": "p",
            "steps": [{"name": f"s{i}", "run": "x", "priority": priority} for i in range(steps)],
        }
    )
    s.submit(RunRecord(id=run_id, pipeline="p", created_at=now, project=project), plan(spec), now)


def started(s: Scheduler, now: float) -> list[str]:
    s.tick(now)
    return [f"{t.run_id}/{t.step.name}" for _, t in s.take().dispatch]


def end(s: Scheduler, run_id: str, step: str, now: float) -> None:
    attempt = s.steps[run_id][step].current_attempt
    assert s.on_outcome(
        StepOutcome(
            attempt_id=attempt, run_id=run_id, step=step, state=StepState.SUCCEEDED, exit_code=0
        ),
        now,
    )


def test_a_project_s_one_step_takes_the_next_slot_before_another_s_thousand():
    s = scheduler(Share())
    submit(s, "a", "big", 1000)
    submit(s, "b", "small", 1, now=1.0)
    assert started(s, 1.0) == ["a/s0", "b/s0"]  # 2 slots: one each
    end(s, "a", "s0", 2.0)
    assert started(s, 2.0) == ["a/s1"]


def test_with_fair_share_off_the_older_run_goes_first():
    s = scheduler(Share(fair=False))
    submit(s, "a", "big", 1000)
    submit(s, "b", "small", 1, now=1.0)
    assert started(s, 1.0) == ["a/s0", "a/s1"]
    end(s, "a", "s0", 2.0)
    assert started(s, 2.0) == ["a/s2"]


def test_weights_divide_a_contended_pool():
    s = Scheduler(
        {"default": PoolConfig(name="default", workers=1, cpus=6)},
        share=Share({"web": ProjectConfig(name="web", weight=2)}),
    )
    s.tick(0.0)
    for rec in s.take().start_workers:
        s.register_worker(rec.model_copy(update={"cpus": 6}), 0.0)
    s.take()
    submit(s, "o", "ops", 10)
    submit(s, "w", "web", 10, now=1.0)
    placed = started(s, 1.0)
    assert sum(p.startswith("w/") for p in placed) == 4 and len(placed) == 6


def test_priority_orders_within_a_project_not_across():
    s = scheduler(Share())
    submit(s, "a1", "a", 2)
    submit(s, "a2", "a", 1, priority=5)
    submit(s, "b1", "b", 1, priority=-5)
    assert started(s, 1.0) == ["a2/s0", "b1/s0"]


def test_a_project_at_its_running_quota_waits_and_others_go_on():
    s = scheduler(Share({"a": ProjectConfig(name="a", max_running_steps=1)}))
    submit(s, "a", "a", 3)
    submit(s, "b", "b", 3, now=1.0)
    assert started(s, 1.0) == ["a/s0", "b/s0"]
    end(s, "b", "s0", 2.0)
    assert started(s, 2.0) == ["b/s1"]  # a's next waits although a slot is free
    end(s, "a", "s0", 3.0)
    assert started(s, 3.0) == ["a/s1"]


def core(tmp_path, **projects) -> MasterCore:
    settings = Settings(
        home=tmp_path,
        projects={name: ProjectConfig(name=name, **cfg) for name, cfg in projects.items()},
    )
    return MasterCore(settings, MemoryStore(), clock=lambda: 1000.0)


PIPELINE = {"name": "p", "steps": [{"name": "a", "run": "x"}]}


def test_a_submission_past_the_queued_quota_is_refused_and_nothing_stored(tmp_path):
    c = core(tmp_path, web={"max_queued_runs": 2})
    web = Caller(token_id="t" * 12, project="web", admin=False)
    for _ in range(2):
        assert isinstance(c.submit(PIPELINE, caller=web, project="web"), Submitted)
    refused = c.submit(PIPELINE, caller=web, project="web")
    assert isinstance(refused, OverQuota)
    assert refused.detail == (
        "project web has 2 queued runs, its quota (max_queued_runs: 2); "
        "submit again once some have started"
    )
    assert len(c.store.list_runs(project="web")) == 2
    assert isinstance(c.submit(PIPELINE, project="ops"), Submitted)  # others are not held


def test_the_audit_names_who_did_what_and_runs_keep_their_project(tmp_path):
    c = core(tmp_path)
    web = Caller(token_id="abc123abc123", project="web", admin=False)
    run_id = c.submit(PIPELINE, caller=web, project="web").run_id
    c.cancel(run_id, caller=web)
    again = c.submissions.rerun(run_id, caller=Caller(token_id="feedfeedfeed")).run_id
    assert c.store.get_run(again).project == "web"  # a re-run is its run's project's
    audit = c.store.list_audit()
    assert [(a.action, a.token_id, a.project, a.run_id, a.run_project) for a in audit] == [
        ("rerun", "feedfeedfeed", "default", again, "web"),
        ("cancel", "abc123abc123", "web", run_id, "web"),
        ("submit", "abc123abc123", "web", run_id, "web"),
    ]
    assert [r.id for r in c.store.list_runs(project="web")] == [again, run_id]
    assert c.store.list_runs(project="ops") == []
    events = c.events.page(0, None)["events"]
    assert {e["project"] for e in events} == {"web"}


def test_a_project_s_secrets_are_looked_for_in_its_own_folder(tmp_path):
    (tmp_path / "secrets" / "web").mkdir(parents=True)
    (tmp_path / "secrets" / "web" / "KEY").write_text("s3cr3t-value")
    settings = Settings(home=tmp_path, secrets_dir=tmp_path / "secrets")
    c = MasterCore(settings, MemoryStore(), clock=lambda: 1000.0)
    pipeline = {"name": "p", "steps": [{"name": "a", "run": "x", "secrets": ["KEY"]}]}
    assert isinstance(c.submit(pipeline, project="web"), Submitted)
    refused = c.submit(pipeline, project="ops")
    assert "project ops has no such secret" in refused.problems[0]


def test_a_projects_file_loads_and_a_bad_one_is_named(tmp_path):
    f = tmp_path / "projects.yaml"
    f.write_text("projects:\n  - {name: web, weight: 2, max_running_steps: 3}\n")
    assert load_projects(f)["web"].max_running_steps == 3
    f.write_text("projects:\n  - {name: web, weight: 0}\n")
    with pytest.raises(SpecError, match="weight"):
        load_projects(f)
    f.write_text("projects:\n  - {name: web, quota: 3}\n")
    with pytest.raises(SpecError, match="quota"):
        load_projects(f)


def test_a_project_uses_only_the_pools_it_is_given(tmp_path):
    """Issue 24, item 12: `pools:` in the projects file, enforced at submission."""
    from cicd_ray.pools import PoolConfig
    from cicd_ray.protocol import Rejected

    settings = Settings(
        home=tmp_path,
        projects={"web": ProjectConfig(name="web", pools=["default"])},
        pools={"default": PoolConfig(name="default"), "gpu": PoolConfig(name="gpu")},
    )
    c = MasterCore(settings, MemoryStore(), clock=lambda: 1000.0)
    costly = {
        "name": "p",
        "steps": [{"name": "a", "run": "x", "pool": "gpu"}, {"name": "b", "run": "x"}],
    }
    refused = c.submit(costly, project="web")
    assert isinstance(refused, Rejected)
    assert refused.problems == [
        "steps[a].pool: project web may not use pool gpu; its pools are default"
    ]
    assert c.store.list_runs() == []
    assert isinstance(c.submit(PIPELINE, project="web"), Submitted)
    assert isinstance(c.submit(costly, project="ops"), Submitted)  # not listed: every pool


def test_every_project_has_a_queued_runs_quota_by_default(tmp_path):
    """Issue 24, item 18: quotas were off unless the projects file set them."""
    c = MasterCore(Settings(home=tmp_path, max_queued_runs=2), MemoryStore(), clock=lambda: 1000.0)
    for _ in range(2):
        assert isinstance(c.submit(PIPELINE, project="unlisted"), Submitted)
    refused = c.submit(PIPELINE, project="unlisted")
    assert isinstance(refused, OverQuota) and "(max_queued_runs: 2)" in refused.detail


def test_a_run_s_logs_stop_at_its_budget_with_a_line_saying_so(tmp_path):
    """Issue 24, item 18: each attempt was capped, a run was not (5 MiB x 21 attempts x
    5,000 steps)."""
    from cicd_ray.master.logbudget import LogBudget
    from cicd_ray.pools import PoolConfig
    from cicd_ray.reads.runs import run_view
    from tests.builders import make

    budget = LogBudget(100)
    assert budget.admit("r/a/1", b"x" * 60) == b"x" * 60
    cut = budget.admit("r/b/1", b"y" * 60)
    assert cut.startswith(b"y" * 40 + b"\n[cicd-ray] log dropped: this run's logs reached 100")
    assert budget.admit("r/b/1", b"more") == b"" and budget.admit("other/a/1", b"z") == b"z"
    settings = Settings(
        home=tmp_path,
        log_run_max_bytes=2000,
        pools={"default": PoolConfig(name="default", workers=1, cpus=2)},
    )
    core, driver = make(settings)
    steps = [{"name": f"s{i}", "run": "head -c 1500 /dev/zero | tr '\\\\0' x"} for i in range(3)]
    run_id = core.submit({"name": "loud", "steps": steps}).run_id
    driver.run_until_idle()
    view = run_view(core.store, run_id)
    logs = [core.store.read_log(a.id) for a in view.attempts]
    assert sum(len(x) for x in logs) < 2000 + 3 * 200
    assert sum(b"(CICD_RAY_LOG_RUN_MAX_BYTES)" in x for x in logs) == 2
    assert view.run.state.value == "succeeded"
