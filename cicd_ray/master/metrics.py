"""The project's metrics, all here, all named `cicd_*`, recorded by the master.

They go through `ray.util.metrics` (the actor hands its module in: nothing here imports Ray),
so every node's metrics agent exports them on its Prometheus endpoint (Ray adds the `ray_`
prefix: `ray_cicd_queued_steps`) and the Ray dashboard's metrics views and Grafana can chart
them (kuberay/grafana-dashboard.json).
"""

from __future__ import annotations

from typing import Any

from cicd_ray.master.commit import Observer
from cicd_ray.records import AttemptRecord, Changes, RunRecord, WorkerRecord
from cicd_ray.states import StepState, WorkerState

SECONDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]
STORE_SECONDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1]

# The names a dashboard may query (tests check the Grafana dashboard against them).
NAMES = (
    "cicd_queued_steps",
    "cicd_oldest_queued_seconds",
    "cicd_wait_slot_seconds",
    "cicd_wait_capacity_seconds",
    "cicd_step_run_seconds",
    "cicd_step_outcomes_total",
    "cicd_runs_finished_total",
    "cicd_active_runs",
    "cicd_workers",
    "cicd_master_transitions_total",
    "cicd_store_write_seconds",
    "cicd_workers_lost_total",
    "cicd_pool_max_workers",
    "cicd_master_started_at_seconds",
    "cicd_worker_network_bytes_per_second",
)


class Metrics(Observer):
    """Created once per master process (Ray metrics are per process), from a module of metric
    kinds: `ray.util.metrics` on the cluster, anything with `Counter`, `Gauge` and `Histogram`
    in a test."""

    def __init__(self, kinds: Any) -> None:
        Counter, Gauge, Histogram = kinds.Counter, kinds.Gauge, kinds.Histogram
        self.queued = Gauge(
            "cicd_queued_steps", "steps ready and waiting for a slot", tag_keys=("pool",)
        )
        self.oldest = Gauge(
            "cicd_oldest_queued_seconds",
            "how long the oldest ready step has waited",
            tag_keys=("pool",),
        )
        self.wait_slot = Histogram(
            "cicd_wait_slot_seconds",
            "an attempt's wait for a busy worker",
            boundaries=SECONDS,
            tag_keys=("pool",),
        )
        self.wait_capacity = Histogram(
            "cicd_wait_capacity_seconds",
            "an attempt's wait for a worker or node to come up",
            boundaries=SECONDS,
            tag_keys=("pool",),
        )
        self.run_time = Histogram(
            "cicd_step_run_seconds", "an attempt's run time", boundaries=SECONDS, tag_keys=("pool",)
        )
        self.outcomes = Counter(
            "cicd_step_outcomes_total", "attempts ended, by state", tag_keys=("pool", "state")
        )
        self.runs = Counter("cicd_runs_finished_total", "runs ended, by state", tag_keys=("state",))
        self.active = Gauge("cicd_active_runs", "runs queued or running")
        self.workers = Gauge(
            "cicd_workers", "worker actors, by pool and state", tag_keys=("pool", "state")
        )
        self.transitions = Counter(
            "cicd_master_transitions_total",
            "records the master changed (runs, steps, attempts, workers)",
        )
        self.store_write = Histogram(
            "cicd_store_write_seconds", "one batch written to the store", boundaries=STORE_SECONDS
        )
        self.lost = Counter(
            "cicd_workers_lost_total", "workers lost (died or went silent)", tag_keys=("pool",)
        )
        self.pool_max = Gauge(
            "cicd_pool_max_workers",
            "the most workers a pool may have (its budget)",
            tag_keys=("pool",),
        )
        self.started = Gauge(
            "cicd_master_started_at_seconds",
            "when the running master started (a change is a restart)",
        )
        self.network = Gauge(
            "cicd_worker_network_bytes_per_second",
            "bytes a worker's node sent (out) or received (in) per second, at its last heartbeat",
            tag_keys=("pool", "worker", "direction"),
        )
        self._worker_tags: set[tuple[str, str]] = set()

    def attempt_ended(self, attempt: AttemptRecord) -> None:
        tags = {"pool": attempt.pool or "unknown"}
        self.outcomes.inc(1, {**tags, "state": attempt.state.value})
        self.wait_slot.observe(attempt.wait_slot_s, tags)
        self.wait_capacity.observe(attempt.wait_capacity_s, tags)
        if attempt.finished_at is not None:
            self.run_time.observe(max(0.0, attempt.finished_at - attempt.started_at), tags)

    def run_ended(self, run: RunRecord) -> None:
        self.runs.inc(1, {"state": run.state.value})

    def committed(self, changes: Changes, took_s: float, now: float) -> None:
        """An observer of the master's commits: what changed, and how long the write took."""
        moved = (
            len(changes.runs) + len(changes.steps) + len(changes.attempts) + len(changes.workers)
        )
        if moved:  # (a batch may hold only a schedule's slot, deliveries, audit records)
            self.transitions.inc(moved)
        self.store_write.observe(took_s)
        for attempt in changes.attempts.values():
            if attempt.state is not StepState.RUNNING:
                self.attempt_ended(attempt)
        for run in changes.runs.values():
            if run.state.terminal:
                self.run_ended(run)
        for worker in changes.workers.values():
            self.worker_changed(worker)

    def worker_changed(self, worker: WorkerRecord) -> None:
        if worker.state is WorkerState.LOST:
            self.lost.inc(1, {"pool": worker.pool})
        for direction, value in (
            ("out", worker.net_sent_bytes_per_s),
            ("in", worker.net_recv_bytes_per_s),
        ):
            if value is not None:
                self.network.set(
                    value, {"pool": worker.pool, "worker": worker.id, "direction": direction}
                )

    def snapshot(
        self,
        queue: dict[str, dict],
        active_runs: int,
        workers: dict[tuple[str, str], int],
        pool_max: dict[str, int],
        started_at: float,
    ) -> None:
        """The gauges, from the master's view: queue per pool, runs, workers per state, the
        pools' budgets, when the master started (set again each time: a gauge set once, at
        start, is not reliably exported)."""
        self.started.set(started_at)
        for pool, most in pool_max.items():
            self.pool_max.set(most, {"pool": pool})
        for pool, view in queue.items():
            self.queued.set(view["queued"], {"pool": pool})
            self.oldest.set(view["oldest_wait_s"], {"pool": pool})
        self.active.set(active_runs)
        # A pool and state seen before and now empty must read 0, not its last value.
        for key in self._worker_tags | set(workers):
            self.workers.set(workers.get(key, 0), {"pool": key[0], "state": key[1]})
        self._worker_tags |= set(workers)
