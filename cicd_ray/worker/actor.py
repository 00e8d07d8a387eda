"""The worker actor: registers with the master, heartbeats its resource use, runs steps.

A threaded actor: each `run_step` call runs in its own thread (the master never gives a worker
more than its capacity), while a background thread registers and heartbeats.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import psutil
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from cicd_ray.config import Settings, parse_uids
from cicd_ray.names import MASTER_NAME, NAMESPACE, worker_actor_name
from cicd_ray.ownership import private_folder
from cicd_ray.pools import PoolConfig
from cicd_ray.protocol import StepOutcome, StepTask
from cicd_ray.records import WorkerRecord
from cicd_ray.source import unpack
from cicd_ray.states import StepState
from cicd_ray.worker.config import ExecConfig
from cicd_ray.worker.execution import Execution
from cicd_ray.worker.isolation import STEP_ROOT, describe, isolating, sweep, sweep_due
from cicd_ray.worker.process import tree_rss

log = logging.getLogger(__name__)

WORKER_THREADS = 64  # upper bound on concurrent calls; the master decides how many steps run
LOG_DRAIN_TIMEOUT_S = 30.0
FINISHED_KEPT = 500  # recent outcomes repeated to a restarted master
REPORT_FOR_S = 600.0  # how long a worker keeps offering an outcome to a master that is down


class Worker:
    """A worker actor: registers with the master, heartbeats its resource use, runs the steps it
    is given (several at once, up to its slots), and reports each outcome."""

    def __init__(self, record: WorkerRecord, settings: Settings) -> None:
        self.record = record
        self.settings = settings
        self.record.node = ray.get_runtime_context().get_node_id()
        self.work_dir = settings.work_dir / record.id
        self.exec_config = ExecConfig.of(
            settings, self.work_dir, parse_uids(settings.step_uids), STEP_ROOT / record.id
        )
        self.record.isolation = describe(self.exec_config.step_uids)
        self._running: dict[str, Execution] = {}
        # Recent outcomes, told to a master that restarted (it may have missed them).
        self._finished: OrderedDict[str, StepOutcome] = OrderedDict()
        self._epoch = 0.0  # the epoch of the master this worker last registered with
        self._source_lock = threading.Lock()
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._net_last: tuple[float, int, int] | None = None
        self._master = None
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()

    # --- called by the master ----------------------------------------------------------------

    def ready(self) -> str:
        return self.record.id

    def pid(self) -> int:
        return os.getpid()

    def run_step(self, task: StepTask) -> StepOutcome:
        sent: list[tuple[int, bytes, ray.ObjectRef]] = []

        def ship(seq: int, data: bytes) -> None:
            ref = self._master_handle().append_log.remote(task.attempt_id, seq, data)
            sent.append((seq, data, ref))

        try:
            source = self._source_dir(task.source_digest) if task.source_digest else None
        except Exception as e:  # an unusable source is the step's failure, reported as data
            return StepOutcome(
                attempt_id=task.attempt_id,
                run_id=task.run_id,
                step=task.step.name,
                state=StepState.FAILED,
                reason=f"could not prepare the source snapshot: {e}",
            )
        execution = Execution(task, self.exec_config, source, ship)
        self._running[task.attempt_id] = execution
        try:
            outcome = execution.run()
        finally:
            self._running.pop(task.attempt_id, None)
        if sent:
            self._deliver_log(task.attempt_id, sent)
        self._finished[task.attempt_id] = outcome
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)
        if task.master_epoch != self._epoch:
            self._report(outcome)  # the master that dispatched it is gone
        return outcome

    def _deliver_log(self, attempt_id: str, sent: list[tuple[int, bytes, ray.ObjectRef]]) -> None:
        """Streamed chunks must be stored before the outcome is, so a finished step's log is
        whole: a chunk sent to a master that died on the way is sent again to the current one
        (the store keeps a chunk sent twice once)."""
        ray.wait([ref for _, _, ref in sent], num_returns=len(sent), timeout=LOG_DRAIN_TIMEOUT_S)
        lost = []
        for seq, data, ref in sent:
            try:
                ray.get(ref, timeout=0)
            except RayError:
                lost.append((seq, data))
        deadline = time.monotonic() + REPORT_FOR_S
        while lost and not self._stop.is_set() and time.monotonic() < deadline:
            try:
                master = self._master_handle()
                ray.get(
                    [master.append_log.remote(attempt_id, seq, data) for seq, data in lost],
                    timeout=30,
                )
                return
            except (RayError, ValueError):
                self._master = None
            self._stop.wait(0.5)

    def _report(self, outcome: StepOutcome) -> None:
        """Send an outcome to the current master until it acknowledges it."""
        deadline = time.monotonic() + REPORT_FOR_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                if ray.get(self._master_handle().report.remote(outcome), timeout=30):
                    return
            except (RayActorError, GetTimeoutError, ValueError):
                self._master = None
            self._stop.wait(0.5)

    def cancel(self, attempt_id: str) -> bool:
        execution = self._running.get(attempt_id)
        if execution is None:
            return False
        execution.cancel()
        return True

    def stop(self) -> None:
        self._stop.set()
        for execution in list(self._running.values()):
            execution.cancel()
        ray.actor.exit_actor()

    # --- internals ---------------------------------------------------------------------------

    def _master_handle(self):
        if self._master is None:
            self._master = ray.get_actor(MASTER_NAME, namespace=NAMESPACE)
        return self._master

    def _source_dir(self, digest: str) -> Path:
        cache = self.settings.work_dir / "sources"  # the worker's alone: steps get a copy
        dest = cache / digest
        with self._source_lock:
            if not dest.is_dir():
                store = self.exec_config.artifacts
                data = store.read(digest) if store is not None else None
                if data is None:  # a run submitted before snapshots went to the artifact store
                    data = ray.get(self._master_handle().get_source.remote(digest), timeout=300)
                if data is None:
                    raise FileNotFoundError(
                        f"source snapshot {digest[:12]} is not in the artifact store"
                    )
                cache.mkdir(parents=True, exist_ok=True, mode=0o700)
                unpack(
                    data,
                    dest,
                    digest,
                    self.settings.source_unpacked_limit_bytes,
                    self.settings.source_max_members,
                )
        return dest

    def _usage(self) -> dict[str, float]:
        rss = tree_rss(self._process)
        private_folder(self.work_dir)
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "memory_used_mb": round(rss / 2**20, 1),
            "disk_used_percent": psutil.disk_usage(str(self.work_dir)).percent,
            **self._network(),
        }

    def _network(self) -> dict[str, float]:
        """The node's network bytes sent and received (its link is the workers' link), in
        all and per second since the last heartbeat."""
        counters = psutil.net_io_counters()
        now = time.monotonic()
        out = {
            "net_sent_bytes": float(counters.bytes_sent),
            "net_recv_bytes": float(counters.bytes_recv),
        }
        if self._net_last is not None:
            then, sent, recv = self._net_last
            elapsed = max(now - then, 1e-3)
            out["net_sent_bytes_per_s"] = round(max(0, counters.bytes_sent - sent) / elapsed, 1)
            out["net_recv_bytes_per_s"] = round(max(0, counters.bytes_recv - recv) / elapsed, 1)
        self._net_last = (now, counters.bytes_sent, counters.bytes_recv)
        return out

    def _heartbeat_loop(self) -> None:
        # A call stuck on a restarting master is given up well before it would count as silence.
        call_timeout_s = max(1.0, self.settings.heartbeat_timeout_s / 2)
        registered = False
        while not self._stop.is_set():
            try:
                master = self._master_handle()
                if not registered:
                    self._epoch = ray.get(
                        master.register.remote(
                            self.record, list(self._running), list(self._finished.values())
                        ),
                        timeout=call_timeout_s,
                    )
                    registered = True
                else:
                    epoch = ray.get(
                        master.heartbeat.remote(self.record.id, self._usage()),
                        timeout=call_timeout_s,
                    )
                    # A new master (restarted) must hear what this worker runs and finished.
                    registered = epoch is not None and epoch == self._epoch
            except (RayActorError, GetTimeoutError, ValueError) as e:
                # The master is restarting or not yet there: keep trying; it finds us by name.
                log.warning("worker %s: master not reachable (%s); retrying", self.record.id, e)
                self._master = None
                registered = False
            self._sweep()
            self._stop.wait(self.settings.heartbeat_interval_s if registered else 0.5)

    def _sweep(self) -> None:
        """Processes left by attempts of a worker that died on this machine die here."""
        uids = self.exec_config.step_uids
        if isolating(uids) and sweep_due(time.time()):
            try:
                killed = sweep(uids)
            except Exception as e:  # housekeeping: never a reason to stop heartbeating
                log.warning("worker %s: sweeping step users failed: %s", self.record.id, e)
                return
            if killed:
                log.warning(
                    "worker %s: killed %d process(es) left by a worker that died",
                    self.record.id,
                    killed,
                )


def worker_bundle(pool: PoolConfig, settings: Settings) -> dict[str, float]:
    """The Ray resources one worker of the pool asks for (what the autoscaler must fit)."""
    bundle: dict[str, float] = {"CPU": pool.cpus, **pool.resources}
    if pool.memory_mb and settings.reserve_memory:
        bundle["memory"] = pool.memory_mb * 2**20
    return bundle


def start_worker(record: WorkerRecord, settings: Settings):
    """Create the detached worker actor. Its resources are explicit, so a worker the cluster
    cannot place yet is pending demand the Ray autoscaler can act on."""
    bundle = worker_bundle(settings.pools[record.pool], settings)
    actor = ray.remote(Worker).options(
        name=worker_actor_name(record.id),
        namespace=NAMESPACE,
        lifetime="detached",
        num_cpus=bundle.pop("CPU"),
        memory=bundle.pop("memory", None),
        resources=bundle or None,
        max_restarts=0,
        max_concurrency=WORKER_THREADS,
    )
    return actor.remote(record, settings)
