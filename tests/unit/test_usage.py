"""Right-sizing and cost from recorded history (pure)."""

from __future__ import annotations

from cicd_ray.pools import PoolConfig
from cicd_ray.reads.usage import percentile, pipeline_costs, pool_costs, recommend


def view(pipeline: str, steps: dict[str, dict], attempts: list[dict]) -> dict:
    return {
        "run": {"pipeline": pipeline},
        "steps": [
            {"spec": {"name": n, "base": n.split("[")[0], "pool": "default", **s}}
            for n, s in steps.items()
        ],
        "attempts": attempts,
    }


def attempt(
    step: str,
    peak: float,
    cpu_time: float,
    duration: float = 10.0,
    state: str = "succeeded",
    started: float = 100.0,
) -> dict:
    return {
        "step": step,
        "state": state,
        "peak_memory_mb": peak,
        "cpu_time_s": cpu_time,
        "duration_s": duration,
        "started_at": started,
        "finished_at": started + duration,
    }


def test_percentile():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([10.0], 95) == 10.0
    assert percentile([0, 100], 95) == 95


def test_recommend_flags_over_and_under_asking_steps():
    steps = {"lint": {"cpu": 4.0, "memory_mb": 8192}, "build": {"cpu": 1.0, "memory_mb": 256}}
    views = [
        view("p", steps, [attempt("lint", 100, 5), attempt("build", 900, 25)]) for _ in range(4)
    ]
    advice = {a.step: a for a in recommend(views)}
    lint, build = advice["lint"], advice["build"]
    assert (lint.cpu, lint.memory_mb) == (0.75, 128)  # 0.5 CPU and 100 MiB used, +20%
    assert lint.note == "asks 4 CPUs, uses 0.50; asks 8192 MiB, uses 100"
    assert (build.cpu, build.memory_mb) == (3.0, 1088)
    assert build.note == "uses 2.50 CPUs, asks only 1; uses 900 MiB, asks only 256"


def test_recommend_needs_history_and_ignores_failed_attempts():
    steps = {"t": {"cpu": 1.0, "memory_mb": 512}}
    views = [view("p", steps, [attempt("t", 100, 5), attempt("t", 900, 9, state="failed")])]
    [advice] = recommend(views)
    assert advice.cpu is None and advice.note.startswith("not enough history (1 succeeded")


def test_matrix_variants_are_advised_together():
    steps = {
        "test[py=3.11]": {"cpu": 1.0, "memory_mb": 512},
        "test[py=3.12]": {"cpu": 1.0, "memory_mb": 512},
    }
    views = [
        view("p", steps, [attempt("test[py=3.11]", 300, 5), attempt("test[py=3.12]", 400, 5)])
        for _ in range(2)
    ]
    [advice] = recommend(views)
    assert (advice.step, advice.samples) == ("test", 4)


def test_pool_costs_from_worker_lifetimes_within_the_period():
    pools = {"default": PoolConfig(name="default", price_per_hour=0.36)}
    workers = [
        {"pool": "default", "started_at": 0, "stopped_at": 3600},
        {"pool": "default", "started_at": 1800, "stopped_at": None},
        {"pool": "gone", "started_at": 1800, "stopped_at": 1900},
    ]
    costs = {c.name: c for c in pool_costs(workers, pools, since=1800, now=5400)}
    assert costs["default"].worker_seconds == 1800 + 3600
    assert round(costs["default"].money, 4) == 0.54
    assert (costs["gone"].worker_seconds, costs["gone"].money) == (100, 0)  # no price known


def test_pipeline_costs_charge_each_attempt_its_share_of_the_worker():
    pools = {"default": PoolConfig(name="default", cpus=4, price_per_hour=3.6)}
    steps = {"a": {"cpu": 1.0, "memory_mb": 0}, "b": {"cpu": 4.0, "memory_mb": 0}}
    views = [
        view(
            "p",
            steps,
            [
                attempt("a", 1, 1, duration=100),
                attempt("b", 1, 1, duration=100),
                attempt("a", 1, 1, duration=100, started=0),
            ],
        )
    ]
    [c] = pipeline_costs(views, pools, since=50)
    assert (c.name, c.worker_seconds, round(c.money, 4)) == ("p", 125.0, 0.125)
