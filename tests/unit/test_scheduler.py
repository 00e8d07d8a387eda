"""The pure policy, driven with the time passed in: no Ray, no sleeping."""

from __future__ import annotations

import time

import pytest

from cicd_ray.errors import InvalidTransition, SpecError
from cicd_ray.pipeline.graph import plan
from cicd_ray.pipeline.load import parse_pipeline
from cicd_ray.pools import PoolConfig
from cicd_ray.protocol import StepOutcome
from cicd_ray.records import WorkerRecord
from cicd_ray.scheduler import Scheduler, check_fits
from cicd_ray.states import RunState, StepState, WorkerState
from tests.builders import dispatched, finish, make_scheduler, submit_to


def test_dag_order_fan_out_fan_in():
    s = make_scheduler()
    submit_to(
        s,
        [
            {"name": "a", "run": "x"},
            {"name": "b", "run": "x", "needs": ["a"]},
            {"name": "c", "run": "x", "needs": ["a"]},
            {"name": "d", "run": "x", "needs": ["b", "c"]},
        ],
    )
    assert [n for _, n in dispatched(s, 0)[0]] == ["a"]
    finish(s, "a")
    assert sorted(n for _, n in dispatched(s, 1)[0]) == ["b", "c"]
    finish(s, "b")
    assert dispatched(s, 2)[0] == []
    finish(s, "c")
    assert [n for _, n in dispatched(s, 3)[0]] == ["d"]
    finish(s, "d", now=4)
    d = s.take()
    assert d.changes.runs["r1"].state is RunState.SUCCEEDED
    assert "r1" not in s.runs  # a finished run is dropped from memory; the store keeps it


def test_placement_spreads_over_least_loaded_worker_and_respects_capacity():
    s = make_scheduler()
    submit_to(s, [{"name": f"s{i}", "run": "x"} for i in range(6)])
    placed, _ = dispatched(s, 0)
    assert [w for w, _ in placed] == ["w1", "w2", "w1", "w2"]  # 2 workers x 2 cpus
    finish(s, "s0")
    assert dispatched(s, 1)[0] == [("w1", "s4")]


def test_priority_then_submission_order():
    s = make_scheduler(
        workers=(("w1", 1.0),), pools={"default": PoolConfig(name="default", workers=1, cpus=1)}
    )
    submit_to(s, [{"name": "low", "run": "x"}], run_id="r1")
    submit_to(
        s, [{"name": "high", "run": "x", "priority": 5}, {"name": "mid", "run": "x"}], run_id="r2"
    )
    assert dispatched(s, 0)[0] == [("w1", "high")]
    finish(s, "high", run_id="r2")
    assert dispatched(s, 1)[0] == [("w1", "low")]


def test_backfill_smaller_step_when_the_first_does_not_fit():
    s = make_scheduler(
        workers=(("w1", 2.0),), pools={"default": PoolConfig(name="default", workers=1, cpus=2)}
    )
    submit_to(
        s,
        [
            {"name": "one", "run": "x"},
            {"name": "big", "run": "x", "resources": {"cpu": 2}},
            {"name": "small", "run": "x"},
        ],
    )
    assert dispatched(s, 0)[0] == [("w1", "one"), ("w1", "small")]
    finish(s, "one")
    finish(s, "small")
    assert dispatched(s, 1)[0] == [("w1", "big")]


def test_failure_skips_dependents_transitively_and_fails_run():
    s = make_scheduler()
    submit_to(
        s,
        [
            {"name": "a", "run": "x"},
            {"name": "b", "run": "x", "needs": ["a"]},
            {"name": "c", "run": "x", "needs": ["b"]},
            {"name": "z", "run": "x"},
        ],
    )
    dispatched(s, 0)
    finish(s, "a", StepState.FAILED, code=2)
    d = s.take()
    assert d.changes.steps[("r1", "b")].state is StepState.SKIPPED
    assert d.changes.steps[("r1", "b")].reason == "needs a (failed)"
    assert d.changes.steps[("r1", "c")].reason == "needs b (skipped)"
    assert "r1" in s.runs  # z still runs
    finish(s, "z")
    run = s.take().changes.runs["r1"]
    assert run.state is RunState.FAILED and run.reason == "failed steps: a"


def test_retry_on_failure_until_max_then_fail():
    s = make_scheduler()
    submit_to(s, [{"name": "f", "run": "x", "retry": {"max": 2, "on": ["failure"]}}])
    for attempt in (1, 2, 3):
        placed, d = dispatched(s, attempt)
        assert placed and d.dispatch[0][1].attempt == attempt
        assert d.dispatch[0][1].attempt_id == f"r1/f/{attempt}"
        finish(s, "f", StepState.FAILED, now=attempt, code=1)
    d = s.take()
    assert d.changes.steps[("r1", "f")].state is StepState.FAILED
    assert d.changes.runs["r1"].state is RunState.FAILED


def test_timeout_is_retried_only_when_asked():
    s = make_scheduler()
    submit_to(
        s,
        [
            {"name": "t", "run": "x", "retry": {"max": 1}},
            {"name": "u", "run": "x", "retry": {"max": 1, "on": ["timeout"]}},
        ],
    )
    dispatched(s, 0)
    finish(s, "t", StepState.TIMED_OUT)
    finish(s, "u", StepState.TIMED_OUT)
    placed, _ = dispatched(s, 1)
    assert [n for _, n in placed] == ["u"]
    assert s.steps["r1"]["t"].state is StepState.TIMED_OUT


def test_duplicate_or_stale_outcome_is_ignored():
    s = make_scheduler()
    submit_to(s, [{"name": "a", "run": "x"}, {"name": "b", "run": "x"}])
    dispatched(s, 0)
    attempt = s.steps["r1"]["a"].current_attempt
    ok = StepOutcome(attempt_id=attempt, run_id="r1", step="a", state=StepState.SUCCEEDED)
    assert s.on_outcome(ok, 1) is True
    assert s.on_outcome(ok, 2) is False
    assert s.on_outcome(ok.model_copy(update={"attempt_id": "r1/a/99"}), 2) is False


def test_worker_lost_retries_infra_elsewhere_or_fails():
    s = make_scheduler()
    submit_to(
        s,
        [
            {"name": "a", "run": "x", "retry": {"max": 1, "on": ["infra"], "infra": 0}},
            {"name": "b", "run": "x", "retry": {"infra": 0}},
        ],
    )
    placed, _ = dispatched(s, 0)
    assert placed == [("w1", "a"), ("w2", "b")]
    s.worker_lost("w1", "actor died", 1)
    s.worker_lost("w2", "actor died", 1)
    d = s.take()
    assert d.stop_workers == ["w1", "w2"]
    assert s.steps["r1"]["a"].state is StepState.QUEUED
    assert d.changes.steps[("r1", "b")].state is StepState.FAILED
    assert "worker w2 lost" in d.changes.steps[("r1", "b")].reason
    s.tick(2)  # pool sizing replaces the lost workers
    assert len(s.take().start_workers) == 2


def test_silent_worker_is_marked_lost_after_heartbeat_timeout():
    s = make_scheduler(timeout_s=10)
    submit_to(s, [{"name": "a", "run": "x", "retry": {"max": 1}}])
    dispatched(s, 0)
    assert s.heartbeat("w1", {"cpu_percent": 5.0}, 8) is True
    s.heartbeat("w2", {}, 8)
    s.tick(15)
    assert s.workers["w1"].state is WorkerState.READY
    s.heartbeat("w2", {}, 18)
    placed, d = dispatched(s, 18.5)
    lost = d.changes.workers["w1"]
    assert (lost.state, lost.stopped_at) == (WorkerState.LOST, 18.5)
    assert lost.reason.startswith("lost: no heartbeat for")
    assert "w1" not in s.workers and s.heartbeat("w1", {}, 19) is False
    assert placed == [("w2", "a")]


def test_cancel_cancels_queued_and_kills_running():
    s = make_scheduler()
    submit_to(s, [{"name": "a", "run": "x"}, {"name": "b", "run": "x", "needs": ["a"]}])
    dispatched(s, 0)
    s.cancel("r1", 1)
    d = s.take()
    assert [k.attempt_id for k in d.kill] == ["r1/a/1"]
    assert d.changes.steps[("r1", "b")].state is StepState.CANCELLED
    finish(s, "a", StepState.CANCELLED)
    assert s.take().changes.runs["r1"].state is RunState.CANCELLED


def test_cancel_wins_over_a_step_that_fails_as_it_is_killed():
    s = make_scheduler()
    submit_to(s, [{"name": "a", "run": "x", "retry": {"max": 3}}])
    dispatched(s, 0)
    s.cancel("r1", 1)
    finish(s, "a", StepState.FAILED, code=143)
    d = s.take()
    assert d.changes.steps[("r1", "a")].state is StepState.CANCELLED
    assert d.changes.runs["r1"].state is RunState.CANCELLED


def restored(s: Scheduler, now: float = 100) -> Scheduler:
    """A new scheduler built from what the store holds, as after a master restart."""
    fresh = Scheduler(s.pools, heartbeat_timeout_s=10)
    runs = [r.model_copy(deep=True) for r in s.runs.values()]
    steps = [x.model_copy(deep=True) for run in s.steps.values() for x in run.values()]
    fresh.restore(runs, steps, [w.model_copy(deep=True) for w in s.workers.values()], now)
    return fresh


def test_restore_keeps_running_attempts_until_their_worker_reconciles():
    s = make_scheduler()
    submit_to(
        s,
        [
            {"name": "a", "run": "x", "retry": {"max": 1}},
            {"name": "b", "run": "x", "needs": ["a"]},
            {"name": "c", "run": "x"},
            {"name": "d", "run": "x"},
        ],
    )
    dispatched(s, 0)  # a on w1, c on w2, d on w1
    finish(s, "c")
    fresh = restored(s)
    out = fresh.take()
    assert out.kill == [] and fresh.steps["r1"]["a"].state is StepState.RUNNING
    assert fresh.worker_load("w1") == (2.0, ["r1/a/1", "r1/d/1"])
    # w1 comes back: it finished a while the master was down, and still runs d.
    done = StepOutcome(attempt_id="r1/a/1", run_id="r1", step="a", state=StepState.SUCCEEDED)
    fresh.reconcile("w1", running=["r1/d/1"], finished=[done], now=101)
    assert fresh.steps["r1"]["a"].state is StepState.SUCCEEDED
    assert fresh.steps["r1"]["d"].state is StepState.RUNNING
    placed, _ = dispatched(fresh, 102)
    assert [n for _, n in placed] == ["b"]  # a's dependent goes on, attempt 1 was kept


def test_restore_ends_attempts_a_worker_no_longer_knows_or_whose_worker_is_gone():
    s = make_scheduler()
    submit_to(
        s,
        [
            {"name": "a", "run": "x", "retry": {"max": 1, "infra": 0}},
            {"name": "b", "run": "x", "retry": {"infra": 0}},
        ],
    )
    dispatched(s, 0)  # a on w1, b on w2
    s.workers["w2"].state = WorkerState.LOST  # the store says w2 is gone
    fresh = restored(s)
    assert fresh.steps["r1"]["b"].state is StepState.FAILED
    assert fresh.steps["r1"]["b"].reason == "its worker was gone when the master restarted"
    fresh.reconcile("w1", running=[], finished=[], now=101)
    assert fresh.steps["r1"]["a"].state is StepState.QUEUED  # retried as infra
    placed, _ = dispatched(fresh, 102)
    assert placed == [("w1", "a")]


def test_check_fits_names_unknown_pool_and_oversized_steps():
    pools = {"default": PoolConfig(name="default", cpus=2, memory_mb=1024)}
    spec = parse_pipeline(
        {
            "name": "p",
            "steps": [
                {"name": "a", "run": "x", "pool": "gpu"},
                {
                    "name": "b",
                    "run": "x",
                    "resources": {"cpu": 4, "memory_mb": 2048},
                    "matrix": {"k": [1, 2]},
                },
            ],
        }
    )
    assert check_fits(plan(spec), pools) == [
        "steps (a).pool: unknown pool 'gpu'; configured pools are: default",
        "steps (b).resources.cpu: 4 is more than a worker of pool 'default' has (2); "
        "ask for at most 2",
        "steps (b).resources.memory_mb: 2048 is more than a worker of pool 'default' has "
        "(1024); ask for at most 1024",
    ]


def test_terminal_step_cannot_be_moved():
    s = make_scheduler()
    submit_to(s, [{"name": "a", "run": "x"}, {"name": "b", "run": "x"}])
    dispatched(s, 0)
    finish(s, "a")
    with pytest.raises(InvalidTransition):
        s.book.finish_step(s.steps["r1"]["a"], StepState.FAILED, 2, "")


def test_thousand_steps_through_the_policy_in_well_under_a_second():
    s = make_scheduler(
        workers=tuple((f"w{i}", 4.0) for i in range(8)),
        timeout_s=1e9,
        pools={"default": PoolConfig(name="default", workers=8, cpus=4)},
    )
    submit_to(
        s,
        [{"name": "root", "run": "x"}]
        + [{"name": f"s{i}", "run": "x", "needs": ["root"]} for i in range(1000)],
    )
    t0 = time.perf_counter()
    now = 0.0
    done = 0
    while "r1" in s.runs and now < 100:
        s.tick(now)
        for _, task in s.take().dispatch:
            finish(s, task.step.name, now=now)
            done += 1
        now += 1
    assert done == 1001
    assert time.perf_counter() - t0 < 1.0


def test_lookahead_asks_for_the_workers_of_steps_whose_needs_are_running():
    s = make_scheduler(
        pools={"default": PoolConfig(name="default", cpus=2, min_workers=1, max_workers=4)},
        workers=(("w1", 2.0),),
    )
    submit_to(
        s,
        [
            {"name": "build", "run": "x", "resources": {"cpu": 2}},
            *(
                {"name": f"test{i}", "run": "x", "needs": ["build"], "resources": {"cpu": 2}}
                for i in range(3)
            ),
            {"name": "deploy", "run": "x", "needs": ["test0"]},
        ],
    )
    assert s.lookahead() == {}  # nothing runs yet
    dispatched(s, 0)
    # build runs on w1; the three tests wait for it alone: 1 + 3 workers of 2 CPUs.
    assert s.lookahead() == {"default": 4}
    s.lookahead_on = False  # CICD_RAY_LOOKAHEAD=0: the same moment asks for nothing
    assert s.lookahead() == {}
    s.lookahead_on = True
    finish(s, "build", now=1)
    # The tests are ready now (the sizer's business); deploy waits for test0, not yet running.
    assert s.lookahead() == {}


def test_attempts_record_the_wait_for_capacity_and_for_a_slot():
    s = Scheduler({"default": PoolConfig(name="default", cpus=1, max_workers=1)})
    submit_to(s, [{"name": "a", "run": "x"}, {"name": "b", "run": "x"}], now=10.0)
    s.tick(10.0)
    [started] = s.take().start_workers
    s.register_worker(started.model_copy(), 13.0)  # its node took 3 s to come up
    placed, d = dispatched(s, 13.0)
    first = d.changes.attempts["r1/a/1"]
    assert (first.wait_capacity_s, first.wait_slot_s) == (3.0, 0.0)
    assert placed == [(started.id, "a")]
    finish(s, "a", now=20.0)
    dispatched(s, 20.0)
    attempt = s.attempts["r1/b/1"]
    assert (attempt.wait_capacity_s, attempt.wait_slot_s) == (3.0, 7.0)


def test_interruptible_steps_go_to_the_spot_pool_and_come_back_after_an_eviction():
    pools = {
        "default": PoolConfig(name="default", cpus=2, workers=1),
        "spot": PoolConfig(name="spot", cpus=2, workers=1, spot=True, spot_for=["default"]),
    }
    s = Scheduler(pools)
    s.tick(0)
    for rec in s.take().start_workers:
        s.register_worker(rec.model_copy(update={"id": rec.pool}), 0)
    submit_to(
        s,
        [
            {"name": "cheap", "run": "x", "interruptible": True, "retry": {"max": 1}},
            {"name": "firm", "run": "x"},
        ],
    )
    placed, d = dispatched(s, 1)
    assert sorted(placed) == [("default", "firm"), ("spot", "cheap")]
    assert d.changes.attempts["r1/cheap/1"].pool == "spot"
    s.worker_lost("spot", "node preempted", 2)
    placed, d = dispatched(s, 3)
    assert placed == [("default", "cheap")]  # the retry: on its own pool, beside firm
    assert d.changes.steps[("r1", "cheap")].spot_evicted is True
    assert d.changes.attempts["r1/cheap/2"].pool == "default"


def test_spot_for_must_name_pools_and_be_on_a_spot_pool(tmp_path):
    from cicd_ray.errors import SpecError
    from cicd_ray.pools import load_pools

    path = tmp_path / "pools.yaml"
    path.write_text("pools: [{name: s, spot: true, spot_for: [nope]}]")
    with pytest.raises(SpecError, match=r"pools \(s\)\.spot_for: unknown pool 'nope'"):
        load_pools(path)
    path.write_text("pools: [{name: d}, {name: s, spot_for: [d]}]")
    with pytest.raises(SpecError, match="spot_for is for spot pools; add spot: true"):
        load_pools(path)


def test_a_lost_worker_is_retried_automatically_without_retry_settings():
    """The infra budget (2 by default) is apart from retry.max, and shown in the reason."""
    s = make_scheduler()
    submit_to(s, [{"name": "a", "run": "x"}])
    for n, now in ((1, 1.0), (2, 2.0)):
        (placed,), _ = dispatched(s, now)
        s.worker_lost(placed[0], "node died", now)
        step = s.steps["r1"]["a"]
        assert step.state is StepState.QUEUED and step.infra_retries == n
        assert step.reason == (
            f"attempt {n} infra, retried automatically ({n} of 2): "
            f"worker {placed[0]} lost: node died"
        )
        s.take()
        for w in ("w3", "w4") if n == 1 else ("w5", "w6"):
            s.register_worker(
                WorkerRecord(id=w, pool="default", cpus=2, memory_mb=4096, started_at=now), now
            )
    (placed,), _ = dispatched(s, 3.0)
    s.worker_lost(placed[0], "node died", 3.0)
    assert s.take().changes.runs["r1"].state is RunState.FAILED


@pytest.mark.parametrize(
    "cause, attempts, infra_used, rmax, on, budget, retry, why",
    [
        ("infra", 1, 0, 0, [], 2, True, "infra, retried automatically (1 of 2)"),
        ("infra", 2, 1, 0, [], 2, True, "infra, retried automatically (2 of 2)"),
        ("infra", 3, 2, 0, ["infra"], 2, False, "infra"),
        ("infra", 3, 2, 1, ["infra"], 2, True, "infra"),  # past the budget, retry.max takes over
        ("failure", 1, 0, 0, ["failure"], 2, False, "failure"),
        ("failure", 1, 0, 1, ["failure"], 2, True, "failure"),
        ("failure", 3, 2, 1, ["failure"], 2, True, "failure"),  # infra retries not counted in max
        ("failure", 2, 0, 1, ["failure"], 2, False, "failure"),
        ("timeout", 1, 0, 3, ["failure"], 2, False, "timeout"),
        ("timeout", 1, 0, 1, ["timeout"], 2, True, "timeout"),
        ("infra", 1, 0, 5, ["infra"], 0, True, "infra"),
    ],
)
def test_retry_verdict_table(cause, attempts, infra_used, rmax, on, budget, retry, why):
    from cicd_ray.scheduler.retries import verdict

    spec = plan(
        parse_pipeline(
            {
                "name": "p",
                "steps": [
                    {"name": "a", "run": "x", "retry": {"max": rmax, "on": on, "infra": budget}}
                ],
            }
        )
    )[0]
    got = verdict(spec, cause, attempts, infra_used)
    assert (got.retry, got.automatic, got.why) == (retry, why.startswith("infra, retried"), why)


def test_slots_limit_the_steps_a_worker_runs_at_once():
    pools = {"default": PoolConfig(name="default", workers=1, cpus=8, slots=1)}
    s = make_scheduler(pools=pools, workers=(("w1", 8.0),))
    submit_to(s, [{"name": f"s{i}", "run": "x", "resources": {"cpu": 0.5}} for i in range(4)])
    placed, _ = dispatched(s, 0)
    assert placed == [("w1", "s0")]
    finish(s, "s0")
    assert dispatched(s, 1)[0] == [("w1", "s1")]


def test_a_tiny_cpu_request_is_refused():
    with pytest.raises(SpecError, match=r"greater than or equal to 0\.01"):
        parse_pipeline(
            {"name": "p", "steps": [{"name": "a", "run": "x", "resources": {"cpu": 1e-300}}]}
        )


def _chain(n):
    return [{"name": "s0", "run": "x"}] + [
        {"name": f"s{i}", "run": "x", "needs": [f"s{i - 1}"]} for i in range(1, n)
    ]


def test_a_failure_at_the_head_of_a_3000_step_chain_skips_all_of_it():
    s = make_scheduler()
    submit_to(s, _chain(3000))
    dispatched(s, 0)
    finish(s, "s0", StepState.FAILED, code=1)
    d = s.take()
    assert d.changes.runs["r1"].state is RunState.FAILED
    assert sum(st.state is StepState.SKIPPED for st in d.changes.steps.values()) == 2999
    assert d.changes.steps[("r1", "s2999")].reason == "needs s2998 (skipped)"


def test_restore_of_a_3000_step_chain_and_a_run_it_cannot_follow():
    s = make_scheduler()
    submit_to(s, _chain(3000))
    submit_to(s, [{"name": "a", "run": "x"}], run_id="r2")
    dispatched(s, 0)
    runs = [r.model_copy(deep=True) for r in s.runs.values()]
    steps = [st.model_copy(deep=True) for run in s.steps.values() for st in run.values()]
    fresh = make_scheduler()
    restore_run = fresh.recovery._restore_run

    def fails_for_r2(run, *args):  # as the recursion did on a long chain before it was fixed
        if run.id == "r2":
            raise RecursionError("maximum recursion depth exceeded")
        restore_run(run, *args)

    fresh.recovery._restore_run = fails_for_r2
    fresh.restore(runs, steps, [], 5.0)
    d = fresh.take()
    assert d.changes.runs["r2"].state is RunState.FAILED
    assert "could not be restored after a master restart" in d.changes.runs["r2"].reason
    assert "r1" in fresh.runs and fresh.runs["r1"].state is not RunState.FAILED
