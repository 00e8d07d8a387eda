"""The pool sizer, driven with the time passed in."""

from __future__ import annotations

import pytest

from cicd_ray.errors import SpecError
from cicd_ray.pools import PoolConfig, load_pools
from cicd_ray.scheduler.sizing import (
    PoolMemory,
    WorkerView,
    cap,
    preempt,
    size_pool,
    workers_needed,
)


def pool(**kw) -> PoolConfig:
    values = {
        "name": "p",
        "cpus": 2,
        "min_workers": 0,
        "max_workers": 10,
        "scale_up_step": 4,
        "cooldown_s": 5,
        "window_s": 30,
        "idle_timeout_s": 20,
    }
    return PoolConfig(**{**values, **kw})


def idle(name: str, since: float, started: float = 0.0) -> WorkerView:
    return WorkerView(id=name, ready=True, started_at=started, idle_since=since)


def busy(name: str, cpu: float = 2.0, steps: int = 1) -> WorkerView:
    return WorkerView(id=name, ready=True, started_at=0.0, busy_cpu=cpu, busy_steps=steps)


def test_scale_to_zero_and_up_from_zero():
    p, mem = pool(), PoolMemory()
    assert size_pool(p, [], [], mem, now=0).start == 0  # no queue, min 0: no workers
    grown = size_pool(p, [], [1.0, 1.0, 1.0], mem, now=1)
    assert (grown.needed, grown.start) == (2, 2)  # 3 CPUs of steps, 2 CPUs a worker
    assert grown.why == "3 step(s) queued: 0 -> 2 of 2 workers"


def test_the_scale_up_step_and_the_cooldown():
    p, mem = pool(scale_up_step=3), PoolMemory()
    first = size_pool(p, [], [2.0] * 8, mem, now=0)
    assert first.start == 3  # 8 needed, at most 3 at once
    starting = [WorkerView(id=f"w{i}", ready=False, started_at=0) for i in range(3)]
    assert size_pool(p, starting, [2.0] * 8, mem, now=4).start == 0  # cooling down
    assert size_pool(p, starting, [2.0] * 8, mem, now=5).start == 3


def test_lost_workers_below_the_minimum_are_replaced_despite_the_cooldown():
    p, mem = pool(min_workers=2), PoolMemory()
    assert size_pool(p, [], [], mem, now=0).start == 2
    assert size_pool(p, [busy("w1")], [], mem, now=1).start == 1


def test_starting_the_minimum_does_not_delay_the_first_growth():
    p, mem = pool(min_workers=1), PoolMemory()
    assert size_pool(p, [], [], mem, now=0).start == 1
    # A second later the queue wants more: no cooldown from the warm worker's start.
    assert size_pool(p, [busy("w1")], [2.0], mem, now=1).start == 1


def test_min_and_max():
    assert workers_needed(pool(min_workers=3), [], []) == 3
    assert workers_needed(pool(max_workers=4), [], [2.0] * 50) == 4


def test_target_utilization_is_the_threshold_for_more_workers():
    # At 0.5, a 2-CPU worker is planned for 1 CPU of steps.
    assert workers_needed(pool(), [], [1.0, 1.0]) == 1
    assert workers_needed(pool(target_utilization=0.5), [], [1.0, 1.0]) == 2


def test_slots_limit_steps_per_worker():
    assert workers_needed(pool(cpus=8), [], [0.5] * 6) == 1
    assert workers_needed(pool(cpus=8, slots=2), [], [0.5] * 6) == 3


def test_running_steps_count_as_need():
    assert workers_needed(pool(), [busy("w1"), busy("w2")], [2.0]) == 3


def test_budget_caps_the_pool():
    p = pool(price_per_hour=0.5, budget_per_hour=1.6)
    assert cap(p) == 3
    assert workers_needed(p, [], [2.0] * 10) == 3
    assert cap(pool(price_per_hour=0, budget_per_hour=1)) == 10  # free: only max applies


def test_scale_down_waits_for_the_window_and_the_idle_timeout():
    p, mem = pool(), PoolMemory()
    workers = [busy("a"), busy("b"), busy("c")]
    assert size_pool(p, workers, [], mem, now=0).retire == []
    workers = [idle("a", 10), idle("b", 10), idle("c", 25)]
    assert size_pool(p, workers, [], mem, now=20).retire == []  # need of 3 at t=0 in window
    # t=31: the window no longer holds the need of 3; a and b idle 21 s, c only 6 s.
    shrunk = size_pool(p, workers, [], mem, now=31)
    assert shrunk.retire == ["a", "b"]
    assert shrunk.why == "3 workers, 0 needed over the last 30 s"
    assert size_pool(p, workers[2:], [], mem, now=46).retire == ["c"]


def test_scale_down_keeps_what_the_window_needed_and_the_minimum():
    p, mem = pool(min_workers=1, window_s=0), PoolMemory()
    workers = [idle("a", 0), idle("b", 0)]
    assert size_pool(p, workers, [], mem, now=100).retire == ["a"]


def test_workers_not_yet_placed_go_first_when_the_need_is_gone():
    p, mem = pool(window_s=0), PoolMemory()
    workers = [idle("old", 0), WorkerView(id="pending", ready=False, started_at=50)]
    assert size_pool(p, workers, [], mem, now=60).retire == ["pending", "old"]


def test_budget_cuts_an_overspending_pool_down():
    p, mem = pool(price_per_hour=1.0, budget_per_hour=1.0, window_s=300), PoolMemory()
    workers = [idle("a", 0), idle("b", 0)]
    assert size_pool(p, workers, [2.0, 2.0], mem, now=50).retire == ["a"]


def test_a_full_cluster_makes_room_for_the_higher_priority_pool():
    pools = {
        "release": pool(name="release", priority=10),
        "nightly": pool(name="nightly", min_workers=1),
    }
    views = {
        "release": [WorkerView(id="r1", ready=False, started_at=0)],
        "nightly": [idle("n1", 0), idle("n2", 5), busy("n3")],
    }
    assert preempt(pools, views, now=30, after_s=60) == []  # a node may still come
    assert preempt(pools, views, now=61, after_s=60) == ["n1", "n2"]
    views["nightly"] = [idle("n1", 0)]  # at its minimum: kept
    assert preempt(pools, views, now=61, after_s=60) == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("pools: [{name: a, workers: 2, max_workers: 3}]", "give either workers"),
        (
            "pools: [{name: a, min_workers: 4, max_workers: 3}]",
            "min_workers 4 is more than max_workers 3",
        ),
        ("pools: [{name: a, target_utilization: 0}]", "target_utilization"),
        ("pools: [{name: a, budget_per_hour: -1}]", "budget_per_hour"),
        ("pools: [{name: a, spare: 1}]", "spare"),
    ],
)
def test_bad_pool_files_name_the_field(tmp_path, text, message):
    path = tmp_path / "pools.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message):
        load_pools(path)


def test_min_workers_alone_raises_the_default_maximum():
    assert PoolConfig(name="a", min_workers=5).max_workers == 5
    assert PoolConfig(name="a", workers=3).min_workers == 3
