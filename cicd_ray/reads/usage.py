"""What steps used and what workers cost, from the recorded history (pure: records in, rows out).

`recommend` suggests each step's resources from its succeeded attempts: the 95th percentile of
its peak memory and of its CPU use (CPU time over run time), plus a margin, and flags steps
asking far more or less than they use. `cost` adds up worker-seconds and money per pool (from
the workers' lifetimes) and per pipeline (each attempt's share of its worker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cicd_ray.pools import PoolConfig

MARGIN = 1.2
MIN_SAMPLES = 3
FAR = 2.0  # asking this many times what it uses (or using more than it asks) is flagged


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Advice:
    step: str
    samples: int
    asked_cpu: float
    asked_memory_mb: int
    used_cpu_p95: float | None = None
    used_memory_mb_p95: float | None = None
    cpu: float | None = None
    memory_mb: int | None = None
    note: str = ""


def recommend(views: list[dict]) -> list[Advice]:
    """Advice per step (by base name: a matrix's variants together) from run views."""
    samples: dict[str, list[dict]] = {}
    asked: dict[str, dict] = {}
    for view in views:
        specs = {s["spec"]["name"]: s["spec"] for s in view["steps"]}
        for attempt in view["attempts"]:
            spec = specs.get(attempt["step"])
            if spec is None:
                continue
            asked[spec["base"]] = spec
            if attempt["state"] == "succeeded" and attempt.get("duration_s"):
                samples.setdefault(spec["base"], []).append(attempt)
    out = []
    for base, spec in sorted(asked.items()):
        got = samples.get(base, [])
        advice = Advice(
            step=base, samples=len(got), asked_cpu=spec["cpu"], asked_memory_mb=spec["memory_mb"]
        )
        memory = [a["peak_memory_mb"] for a in got if a.get("peak_memory_mb") is not None]
        cpu = [
            a["cpu_time_s"] / a["duration_s"]
            for a in got
            if a.get("cpu_time_s") is not None and a["duration_s"] > 0
        ]
        if min(len(memory), len(cpu)) < MIN_SAMPLES:
            advice.note = (
                f"not enough history ({len(got)} succeeded attempts, {MIN_SAMPLES} needed)"
            )
            out.append(advice)
            continue
        advice.used_cpu_p95 = percentile(cpu, 95)
        advice.used_memory_mb_p95 = percentile(memory, 95)
        advice.cpu = max(0.25, math.ceil(advice.used_cpu_p95 * MARGIN * 4) / 4)
        advice.memory_mb = max(64, math.ceil(advice.used_memory_mb_p95 * MARGIN / 64) * 64)
        notes = []
        if advice.asked_cpu >= FAR * advice.cpu:
            notes.append(f"asks {advice.asked_cpu:g} CPUs, uses {advice.used_cpu_p95:.2f}")
        elif advice.used_cpu_p95 > advice.asked_cpu:
            notes.append(f"uses {advice.used_cpu_p95:.2f} CPUs, asks only {advice.asked_cpu:g}")
        if advice.asked_memory_mb >= FAR * advice.memory_mb:
            notes.append(f"asks {advice.asked_memory_mb} MiB, uses {advice.used_memory_mb_p95:.0f}")
        elif advice.used_memory_mb_p95 > advice.asked_memory_mb > 0:
            notes.append(
                f"uses {advice.used_memory_mb_p95:.0f} MiB, asks only {advice.asked_memory_mb}"
            )
        advice.note = "; ".join(notes)
        out.append(advice)
    return out


@dataclass
class Cost:
    name: str
    worker_seconds: float
    money: float


def pool_costs(
    workers: list[dict], pools: dict[str, PoolConfig], since: float, now: float
) -> list[Cost]:
    """Worker-seconds and money per pool over [since, now], from the workers' lifetimes."""
    totals: dict[str, float] = {}
    for w in workers:
        start = max(w["started_at"], since)
        end = min(w.get("stopped_at") or now, now)
        if end > start:
            totals[w["pool"]] = totals.get(w["pool"], 0.0) + end - start
    return [
        Cost(name, secs, secs / 3600 * _price(pools, name)) for name, secs in sorted(totals.items())
    ]


def pipeline_costs(views: list[dict], pools: dict[str, PoolConfig], since: float) -> list[Cost]:
    """Per pipeline: each attempt's run time times its share of its worker's CPUs."""
    totals: dict[str, list[float]] = {}
    for view in views:
        specs = {s["spec"]["name"]: s["spec"] for s in view["steps"]}
        for a in view["attempts"]:
            spec = specs.get(a["step"])
            if spec is None or a["started_at"] < since or not a.get("finished_at"):
                continue
            pool = pools.get(spec["pool"])
            share = min(1.0, spec["cpu"] / pool.cpus) if pool else 1.0
            secs = (a["finished_at"] - a["started_at"]) * share
            row = totals.setdefault(view["run"]["pipeline"], [0.0, 0.0])
            row[0] += secs
            row[1] += secs / 3600 * _price(pools, spec["pool"])
    return [Cost(name, secs, money) for name, (secs, money) in sorted(totals.items())]


def _price(pools: dict[str, PoolConfig], name: str) -> float:
    pool = pools.get(name)
    return pool.price_per_hour if pool else 0.0
