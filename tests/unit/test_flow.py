"""Flow control in the pure policy: the `if:` language, conditions, approvals and concurrency
groups, driven with the time passed in."""

from __future__ import annotations

import time

import pytest

from cicd_ray.errors import SpecError
from cicd_ray.pipeline.conditions import ConditionError, Facts, holds, parse
from cicd_ray.pipeline.graph import plan
from cicd_ray.pipeline.load import parse_pipeline
from cicd_ray.records import WorkerRecord
from cicd_ray.scheduler import Scheduler
from cicd_ray.scheduler.groups import Groups
from cicd_ray.states import RunState, StepState
from tests.builders import dispatched, finish, make_scheduler, submit_to

# --- the condition language ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, column, message",
    [
        ("", 1, "empty condition"),
        (
            "foo()",
            1,
            "unknown function foo(); the functions are always(), cancelled(), failure(), success()",
        ),
        ("success() && bogus.x == 'a'", 14, "unknown variable bogus.x"),
        (
            "run.tag == 'v1'",
            1,
            "unknown variable run.tag; known: run.branch, run.event, run.pipeline",
        ),
        ("matrix.os == 'linux'", 1, "unknown variable matrix.os; the step's matrix keys are: py"),
        ("env.A", 1, "a text is not a condition"),
        ("success() == 'yes'", 14, "== compares a bool with a text"),
        ("(always()", 10, "expected ')', found the end"),
        ("always() ||", 12, "expected a value or a condition, found the end"),
        ("always() always()", 10, "unexpected 'always' after a complete condition"),
        ("run.branch == 'main", 15, "a quoted text is not closed"),
        ("run.branch = 'main'", 12, "unexpected '='"),
        ("(" * 40 + "always()" + ")" * 40, 33, "nested more than 32 deep"),
        ("always() && " * 100 + "always()", 1, "longer than 1000 characters"),
    ],
)
def test_a_condition_that_cannot_be_read_names_the_column(text, column, message):
    with pytest.raises(ConditionError) as err:
        parse(text, frozenset({"py"}))
    assert err.value.column == column
    assert message in str(err.value) and str(err.value).startswith(f"column {column}: ")


def facts(success=True, failure=False, cancelled=False, **run):
    return Facts(
        success=success,
        failure=failure,
        cancelled=cancelled,
        env={"TARGET": "prod"},
        matrix={"py": "3.12"},
        run={"branch": "main", "event": "manual", "pipeline": "p", **run},
    )


@pytest.mark.parametrize(
    "text, given, expected",
    [
        ("success()", facts(), True),
        ("success()", facts(success=False, failure=True), False),
        ("failure()", facts(success=False, failure=True), True),
        ("failure()", facts(), False),
        ("always()", facts(success=False, cancelled=True), True),
        ("cancelled()", facts(success=False, cancelled=True), True),
        ("cancelled()", facts(), False),
        ("run.branch == 'main'", facts(), True),
        ("run.branch == 'main'", facts(branch="feature"), False),
        # Naming no status function means success() too: a failed need settles it.
        ("run.branch == 'main'", facts(success=False, failure=True), False),
        ('run.branch != "main"', facts(branch="feature"), True),
        ("env.TARGET == 'prod' && matrix.py == '3.12'", facts(), True),
        ("env.UNSET == ''", facts(), True),
        ("!(run.event == 'manual') || run.pipeline == 'p'", facts(), True),
        ("!(run.event == 'manual') || run.pipeline == 'q'", facts(), False),
        ("always() && run.branch == 'main'", facts(success=False, failure=True), True),
        ("failure() || cancelled()", facts(success=False, cancelled=True), True),
        ("true && !false", facts(), True),
    ],
)
def test_conditions_evaluate_as_documented(text, given, expected):
    assert holds(parse(text, frozenset({"py"})), given) is expected


def test_a_hostile_condition_is_refused_within_a_second():
    started = time.perf_counter()
    for text in ["!" * 999, "(" * 999, "a" * 999, "'" + "x" * 998, "&&" * 499]:
        with pytest.raises(ConditionError):
            parse(text)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    "step, problem",
    [
        (
            {"name": "a", "run": "x", "if": "run.branch == 'main' && nope()"},
            "steps[0] (a).if: \"run.branch == 'main' && nope()\": column 25: unknown function "
            "nope(); the functions are always(), cancelled(), failure(), success()",
        ),
        (
            {"name": "b", "run": "x", "matrix": {"py": ["3.12"]}, "if": "matrix.os == 'x'"},
            "steps[0] (b).if: \"matrix.os == 'x'\": column 1: unknown variable matrix.os; the "
            "step's matrix keys are: py",
        ),
    ],
)
def test_the_loader_names_the_step_and_column_of_a_bad_condition(step, problem):
    with pytest.raises(SpecError) as err:
        parse_pipeline({"name": "p", "steps": [step]})
    assert err.value.problems == [problem]


# --- conditions in the scheduler --------------------------------------------------------------


def restored(runs, steps, now):
    """A new scheduler taking up `runs` from the store, its workers registered again."""
    again = Scheduler(make_scheduler().pools, heartbeat_timeout_s=10.0)
    again.restore(runs, steps, [], now)
    for name in ("w1", "w2"):
        again.register_worker(
            WorkerRecord(id=name, pool="default", cpus=2.0, memory_mb=4096, started_at=now), now
        )
    again.take()
    return again


def states(s, run_id="r1"):
    return {n: st.state.value for n, st in s.steps[run_id].items()} if run_id in s.steps else None


def ended(s, run_id="r1"):
    """The run's final record from the decisions taken so far."""
    return s.take().changes.runs[run_id]


def test_an_always_step_runs_after_a_failure_and_the_run_still_fails():
    s = make_scheduler()
    submit_to(
        s,
        [
            {"name": "build", "run": "x"},
            {"name": "test", "run": "x", "needs": ["build"]},
            {"name": "report", "run": "x", "needs": ["test"], "if": "failure()"},
            {"name": "cleanup", "run": "x", "needs": ["test"], "if": "always()"},
        ],
    )
    dispatched(s, 0)
    finish(s, "build", StepState.FAILED, code=1)
    assert states(s)["test"] == "skipped"
    assert sorted(n for _, n in dispatched(s, 1)[0]) == ["cleanup", "report"]
    finish(s, "report", now=2)
    finish(s, "cleanup", now=2)
    run = ended(s)
    assert run.state is RunState.FAILED and run.reason == "failed steps: build"


def test_a_false_condition_skips_with_its_reason_and_the_run_succeeds():
    s = make_scheduler()
    submit_to(
        s,
        [
            {"name": "build", "run": "x"},
            {"name": "deploy", "run": "x", "needs": ["build"], "if": "run.branch == 'main'"},
            {"name": "announce", "run": "x", "needs": ["deploy"]},
            {"name": "on-failure", "run": "x", "needs": ["build"], "if": "failure()"},
        ],
        branch="feature",
    )
    dispatched(s, 0)
    finish(s, "build")
    d = s.take()
    deploy = d.changes.steps[("r1", "deploy")]
    assert deploy.state is StepState.SKIPPED and deploy.skipped_by_condition
    assert deploy.reason == "if: run.branch == 'main' was false"
    assert d.changes.steps[("r1", "announce")].reason == "needs deploy (skipped)"
    assert d.changes.steps[("r1", "on-failure")].reason == "if: failure() was false"
    assert d.changes.runs["r1"].state is RunState.SUCCEEDED


def test_a_cancelled_run_runs_its_always_steps_and_ends_cancelled():
    s = make_scheduler()
    submit_to(
        s,
        [
            {"name": "deploy", "run": "x"},
            {"name": "verify", "run": "x", "needs": ["deploy"]},
            {"name": "cleanup", "run": "x", "needs": ["verify"], "if": "always()"},
            {"name": "only-ok", "run": "x", "needs": ["deploy"], "if": "success()"},
        ],
    )
    dispatched(s, 0)
    s.cancel("r1", 1.0)
    assert [k.attempt_id for k in s.take().kill] == ["r1/deploy/1"]
    assert states(s)["verify"] == "cancelled" and states(s)["cleanup"] == "queued"
    finish(s, "deploy", StepState.FAILED, now=2, code=-15)  # killed
    assert states(s)["deploy"] == "cancelled" and states(s)["only-ok"] == "cancelled"
    assert [n for _, n in dispatched(s, 2)[0]] == ["cleanup"]
    finish(s, "cleanup", now=3)
    d = s.take()
    assert d.changes.steps[("r1", "cleanup")].state is StepState.SUCCEEDED
    assert d.changes.runs["r1"].state is RunState.CANCELLED


def test_a_matrix_variant_condition_reads_its_own_values():
    s = make_scheduler()
    submit_to(
        s,
        [
            {
                "name": "t",
                "run": "x",
                "matrix": {"os": ["linux", "mac"]},
                "if": "matrix.os == 'linux'",
            }
        ],
    )
    assert [n for _, n in dispatched(s, 0)[0]] == ["t[os=linux]"]
    assert states(s)["t[os=mac]"] == "skipped"


# --- approvals --------------------------------------------------------------------------------


def test_an_approval_waits_using_no_worker_then_runs_what_follows():
    s = make_scheduler()
    submit_to(
        s,
        [
            {"name": "build", "run": "x"},
            {"name": "gate", "needs": ["build"], "approval": {"prompt": "Ship it?"}},
            {"name": "deploy", "run": "x", "needs": ["gate"], "approval": {"prompt": "Really?"}},
        ],
    )
    dispatched(s, 0)
    finish(s, "build")
    placed, d = dispatched(s, 1)
    assert placed == [] and states(s)["gate"] == "waiting_approval"
    assert d.changes.steps[("r1", "gate")].reason == "waiting for approval: Ship it?"
    assert (
        s.approve("r1", "build", True, "ann", "", 2.0)
        == "step build of run r1 is not waiting for approval (it is succeeded)"
    )
    assert s.approve("r1", "gate", True, "ann", "looks good", 2.0) is None
    gate = s.take().changes.steps[("r1", "gate")]
    assert gate.state is StepState.SUCCEEDED and gate.reason == "approved by ann: looks good"
    assert (gate.approval.by, gate.approval.at, gate.approval.decision) == ("ann", 2.0, "approved")
    assert states(s)["deploy"] == "waiting_approval"
    s.approve("r1", "deploy", True, "bob", "", 3.0)
    assert dispatched(s, 3)[0] == [("w1", "deploy")]


def test_a_rejected_or_unanswered_approval_fails_the_step():
    s = make_scheduler()
    submit_to(
        s,
        [
            {"name": "gate", "approval": {}, "timeout": 60},
            {"name": "after", "run": "x", "needs": ["gate"]},
        ],
    )
    submit_to(s, [{"name": "gate", "approval": {}, "timeout": 60}], run_id="r2")
    s.approve("r1", "gate", False, "carol", "not today", 5.0)
    d = s.take()
    assert d.changes.steps[("r1", "gate")].reason == "rejected by carol: not today"
    assert d.changes.steps[("r1", "after")].state is StepState.SKIPPED
    assert d.changes.runs["r1"].state is RunState.FAILED
    dispatched(s, 59.0)
    assert states(s, "r2") == {"gate": "waiting_approval"}
    s.tick(60.0)
    gate = s.take().changes.steps[("r2", "gate")]
    assert gate.state is StepState.FAILED
    assert gate.reason == "rejected by (timeout): no answer within 60 s"


def test_a_waiting_approval_survives_a_restart():
    s = make_scheduler()
    submit_to(
        s,
        [
            {"name": "gate", "approval": {}, "timeout": 60},
            {"name": "after", "run": "x", "needs": ["gate"]},
        ],
    )
    d = s.take()
    run, steps = d.changes.runs["r1"], list(d.changes.steps.values())
    again = restored([run], steps, 10.0)
    assert states(again) == {"gate": "waiting_approval", "after": "queued"}
    again.approve("r1", "gate", True, "dan", "", 11.0)
    assert dispatched(again, 11)[0] == [("w1", "after")]
    again.tick(100.0)  # the deadline went with the answer
    assert states(again)["gate"] == "succeeded"


# --- concurrency groups -----------------------------------------------------------------------


def test_groups_admit_in_order_up_to_the_limit():
    g = Groups()
    assert g.ask("deploy", "r1", (1, -1), 1)
    assert not g.ask("deploy", "r3", (3, -1), 1)
    assert not g.ask("deploy", "r2", (2, -1), 1)  # older: goes before r3
    assert (g.ahead("deploy", "r2"), g.ahead("deploy", "r3")) == (1, 2)
    assert g.leave("deploy", "r1") == ["r2"]
    assert g.leave("deploy", "r3") == []  # gave up waiting
    assert g.members("deploy") == ["r2"]
    assert g.ask("other", "x", (1, 0), 2) and g.ask("other", "y", (2, 0), 2)


def test_runs_of_a_group_run_one_at_a_time_in_submission_order():
    s = make_scheduler()
    group = {"group": "deploy-main"}
    for i in (1, 2, 3):
        submit_to(s, [{"name": "d", "run": "x"}], run_id=f"r{i}", seq=i, concurrency=group)
    placed, d = dispatched(s, 0)
    assert placed == [("w1", "d")] and s.steps["r1"]["d"].state is StepState.RUNNING
    assert d.changes.runs["r3"].reason == "waiting for concurrency group deploy-main (2 ahead)"
    finish(s, "d", run_id="r1", now=1)
    placed, d = dispatched(s, 1)
    assert placed == [("w1", "d")] and s.steps["r2"]["d"].state is StepState.RUNNING
    assert d.changes.runs["r3"].reason == "waiting for concurrency group deploy-main (1 ahead)"
    s.cancel("r3", 2.0)  # a cancelled waiting run frees its place at once
    assert ended(s, "r3").state is RunState.CANCELLED


def test_cancel_in_progress_replaces_the_older_runs_but_lets_marked_steps_finish():
    s = make_scheduler()
    group = {"group": "deploy", "cancel_in_progress": True}
    submit_to(
        s,
        [
            {"name": "migrate", "run": "x", "interruptible": False},
            {"name": "after", "run": "x", "needs": ["migrate"]},
        ],
        concurrency=group,
    )
    assert dispatched(s, 0)[0] == [("w1", "migrate")]
    submit_to(s, [{"name": "slow", "run": "x"}], run_id="r2", seq=2, concurrency=group)
    assert s.runs["r2"].state is RunState.QUEUED
    submit_to(s, [{"name": "d", "run": "x"}], run_id="r3", seq=3, concurrency=group)
    d = s.take()
    assert d.changes.runs["r2"].state is RunState.CANCELLED
    assert (
        d.changes.runs["r2"].reason == "cancelled: run r3 of concurrency group deploy replaces it"
    )
    assert d.kill == []  # migrate is let finish
    assert states(s) == {"migrate": "running", "after": "cancelled"}
    finish(s, "migrate", run_id="r1", now=2)
    assert ended(s, "r1").state is RunState.CANCELLED
    assert states(s, "r3") == {"d": "queued"}
    assert [n for _, n in dispatched(s, 3)[0]] == ["d"]


def test_a_step_group_holds_steps_across_runs_and_its_order_survives_a_restart():
    s = make_scheduler()
    step = {"name": "deploy", "run": "x", "concurrency": {"group": "prod-${TARGET}"}}
    for i in (1, 2, 3):
        submit_to(s, [step], run_id=f"r{i}", seq=i, env={"TARGET": "eu"})
    placed, d = dispatched(s, 0)
    assert placed == [("w1", "deploy")]
    assert (
        d.changes.steps[("r3", "deploy")].reason
        == "waiting for concurrency group prod-eu (2 ahead)"
    )
    runs = list(s.runs.values())
    steps = [st for run in s.steps.values() for st in run.values()]
    again = restored(list(reversed(runs)), list(reversed(steps)), 5.0)
    # r1's attempt had a worker the new master does not know: it is retried, keeping its place.
    placed, _ = dispatched(again, 5)
    assert [again.steps[r]["deploy"].state.value for r in ("r1", "r2", "r3")] == [
        "running",
        "queued",
        "queued",
    ] and len(placed) == 1
    finish(again, "deploy", run_id="r1", now=6)
    again.tick(6)
    placed, _ = dispatched(again, 7)
    assert again.steps["r2"]["deploy"].state is StepState.RUNNING
    assert again.steps["r3"]["deploy"].state is StepState.QUEUED


def test_a_group_variable_the_run_does_not_set_is_refused():
    spec = parse_pipeline(
        {
            "name": "p",
            "steps": [{"name": "d", "run": "x", "concurrency": {"group": "deploy-${BRANCH}"}}],
        }
    )
    with pytest.raises(SpecError, match=r"\$\{BRANCH\} is not set in the run's env"):
        plan(spec)
    assert plan(spec, {"BRANCH": "main"})[0].concurrency.group == "deploy-main"


def test_scheduler_keeps_no_waiting_members_after_runs_end():
    s: Scheduler = make_scheduler()
    submit_to(s, [{"name": "d", "run": "x"}], concurrency={"group": "g"})
    dispatched(s, 0)
    finish(s, "d", now=1)
    assert s.flow.groups.members(("default", "g")) == []


def test_a_cancelled_run_still_waiting_for_its_group_runs_nothing():
    s = make_scheduler()
    group = {"group": "g"}
    submit_to(s, [{"name": "d", "run": "x"}], concurrency=group)
    submit_to(
        s,
        [{"name": "d", "run": "x"}, {"name": "cleanup", "if": "always()", "run": "x"}],
        run_id="r2",
        seq=2,
        concurrency=group,
    )
    s.cancel("r2", 1.0)
    assert ended(s, "r2").state is RunState.CANCELLED
    assert s.flow.groups.members(("default", "g")) == ["r1"]


def test_a_webhook_url_with_credentials_is_refused():
    with pytest.raises(SpecError, match=r"notify\[0\]\.webhook"):
        parse_pipeline(
            {
                "name": "p",
                "notify": [{"webhook": "https://user:pw@hooks.example/x"}],
                "steps": [{"name": "a", "run": "x"}],
            }
        )


def test_ancestors_are_walked_only_for_conditions_that_name_failure(monkeypatch):
    """Every step is decided through its condition; walking its ancestors each time made a
    3,000-step chain six times slower through the policy (quadratic)."""
    from cicd_ray.scheduler.runbook import RunBook

    walks = []
    real = RunBook._ancestors
    monkeypatch.setattr(
        RunBook, "_ancestors", lambda self, step: walks.append(step.name) or real(self, step)
    )
    s = make_scheduler()
    submit_to(
        s,
        [
            {"name": "a", "run": "x"},
            {"name": "b", "run": "x", "needs": ["a"]},
            {"name": "c", "run": "x", "needs": ["b"], "if": "always()"},
            {"name": "d", "run": "x", "needs": ["c"], "if": "failure()"},
        ],
    )
    for name in ("a", "b", "c"):
        dispatched(s, 0)
        finish(s, name)
    assert walks == ["d"] and states(s) is None  # d skipped, the run over


def test_a_running_step_a_newer_run_s_step_replaces_ends_cancelled_saying_why():
    s = make_scheduler()
    step = {
        "name": "deploy",
        "run": "x",
        "concurrency": {"group": "prod", "cancel_in_progress": True},
    }
    submit_to(s, [step])
    assert dispatched(s, 0)[0] == [("w1", "deploy")]
    submit_to(s, [step], run_id="r2", seq=2)
    assert [k.attempt_id for k in s.take().kill] == ["r1/deploy/1"]
    finish(s, "deploy", StepState.FAILED, now=1, code=-15)  # the kill
    d = s.take()
    old = d.changes.steps[("r1", "deploy")]
    assert old.state is StepState.CANCELLED
    assert old.reason == "cancelled: run r2 of concurrency group prod replaces it"
    assert d.changes.runs["r1"].state is RunState.CANCELLED
    assert [n for _, n in dispatched(s, 2)[0]] == ["deploy"]
    assert s.steps["r2"]["deploy"].state is StepState.RUNNING


def test_concurrency_groups_are_a_projects_own():
    """Issue 24, item 7: project ops' `deploy` group (cancel_in_progress) neither cancels nor
    holds up project web's step of a group of the same name; within a project it holds."""
    s = make_scheduler()
    group = {"group": "deploy", "cancel_in_progress": True}
    submit_to(s, [{"name": "d", "run": "x", "concurrency": group}], project="web")
    submit_to(
        s, [{"name": "d", "run": "x", "concurrency": group}], run_id="r2", seq=2, project="ops"
    )
    submit_to(
        s,
        [{"name": "d", "run": "x"}],
        run_id="r4",
        seq=4,
        concurrency={"group": "deploy"},
        project="web",
    )
    s.tick(0.0)
    assert s.steps["r1"]["d"].admitted and s.steps["r2"]["d"].admitted
    assert not any(step.state.terminal for steps in s.steps.values() for step in steps.values())
    assert not s.runs["r4"].admitted  # web's run waits for web's step r1/d
    assert s.runs["r4"].reason == "waiting for concurrency group deploy (1 ahead)"
