"""The master: one detached named actor carrying out the Scheduler's decisions.

It owns the run queue. Every batch of decisions is written to the store before any of it is
acted on; if the store cannot be written the master exits, and Ray restarts it from the store
(the store is the truth, this actor's memory a cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections import deque

import psutil
import ray
from ray.exceptions import RayActorError, RayError

from cicd_ray.config import Settings
from cicd_ray.errors import SpecError, StoreError
from cicd_ray.metrics import Metrics
from cicd_ray.records import KeyRecord, RunRecord, StepOutcome, StepTask, WorkerRecord
from cicd_ray.retention import collect
from cicd_ray.scheduler import Scheduler, check_fits
from cicd_ray.spec import GitSource, check_env_overrides, parse_pipeline, plan
from cicd_ray.states import StepState
from cicd_ray.store import log_answer, open_store, run_view, runs_page
from cicd_ray.worker import (
    MASTER_NAME,
    NAMESPACE,
    start_worker,
    worker_actor_name,
    worker_bundle,
)

log = logging.getLogger(__name__)

TICK_INTERVAL_S = 0.5  # the longest the master sleeps when nothing happens
RETENTION_INTERVAL_S = 3600.0  # how often old runs, logs and sources are deleted
RETENTION_FIRST_S = 60.0  # the first time, this long after the master starts
RETENTION_MAX_RUNS = 5000  # runs deleted per pass: a backlog goes in bounded steps
RECENT_S = 600.0  # stopped workers shown for this long
EVENTS_KEPT = 10_000


class Master:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.store = open_store(settings.store_url)
        self.sched = Scheduler(settings.pools, heartbeat_timeout_s=settings.heartbeat_timeout_s,
                               lookahead=settings.lookahead)
        self._handles: dict[str, ray.actor.ActorHandle] = {}
        self._wake = asyncio.Event()
        self._finished: dict[str, asyncio.Event] = {}
        self._requested: list[dict[str, float]] = []
        self._surveyed_at = 0.0
        self._collect_at = self.started_at + RETENTION_FIRST_S
        self._collecting = False
        self.metrics = Metrics()
        # Run and step changes for GET /api/v1/events: the latest EVENTS_KEPT, numbered.
        self._events: deque[dict] = deque(maxlen=EVENTS_KEPT)
        self._event_seq = 0
        self._new_events = asyncio.Event()
        self._recover()
        self._commit()
        self._loop = asyncio.get_running_loop().create_task(self._run())

    # --- API for clients -----------------------------------------------------------------------

    async def ping(self) -> dict:
        return {"master": MASTER_NAME, "pid": os.getpid(), "started_at": self.started_at,
                "pools": sorted(self.settings.pools), "store": self.settings.store_url}

    async def submit(self, pipeline: dict | str, env: dict[str, str] | None = None,
                     source: tuple[str, bytes] | None = None,
                     idempotency_key: str | None = None) -> dict:
        """Validate, store, then answer: {"run_id": ...} or {"problems": [...]}.

        The run is durable in the store before its id is returned. A submission repeated with
        the same idempotency key answers with the first run ({"run_id": ..., "existing": True}).
        """
        request = _request_digest(pipeline, env, source)
        if idempotency_key:
            answer = self._known_key(idempotency_key, request)
            if answer is not None:
                return answer
        # Parsing and planning a large document takes time: off the loop that dispatches.
        spec, steps, problems = await asyncio.to_thread(_plan, pipeline, env or {},
                                                        self.settings.pools)
        if source is not None and len(source[1]) > self.settings.source_limit_bytes:
            problems.append(f"source: {len(source[1])} bytes is more than the "
                            f"{self.settings.source_limit_bytes} byte limit")
        if problems:
            return {"problems": problems}
        if idempotency_key:  # the same key may have been submitted while this one was planned
            answer = self._known_key(idempotency_key, request)
            if answer is not None:
                return answer
        now = time.time()
        git = spec.source if isinstance(spec.source, GitSource) else None
        run = RunRecord(id=_new_run_id(now), seq=self.store.next_run_seq(), pipeline=spec.name,
                        created_at=now, source_digest=source[0] if source else None,
                        source_git=None if source else git)
        if source is not None:
            self.store.put_source(*source, at=now)
        self.sched.submit(run, steps, now)
        self._commit({idempotency_key: KeyRecord(run_id=run.id, request=request, at=now)}
                     if idempotency_key else None)
        self._wake.set()  # dispatch its first steps now, not at the next idle tick
        return {"run_id": run.id}

    def _known_key(self, key: str, request: str) -> dict | None:
        """The answer to a key already used: its run, or a conflict for another request."""
        known = self.store.get_key(key)
        if known is None:
            return None
        if known.request and known.request != request:
            return {"conflict": known.run_id}
        return {"run_id": known.run_id, "existing": True}

    async def cancel(self, run_id: str) -> str | None:
        """Cancel a run; idempotent. Returns the run's state, or None for an unknown run."""
        run = self.sched.cancel(run_id, time.time())
        if run is None:
            stored = self.store.get_run(run_id)
            return stored.state.value if stored else None
        self._commit()
        return run.state.value

    async def get_run(self, run_id: str) -> dict | None:
        return run_view(self.store, run_id)

    async def wait(self, run_id: str, timeout_s: float = 30.0) -> str | None:
        """The run's state once it has ended, or its current state after `timeout_s`.

        A long poll, so a client learns of the end at once without polling every step.
        """
        run = self.store.get_run(run_id)
        if run is None or run.state.terminal:
            return run.state.value if run else None
        event = self._finished.setdefault(run_id, asyncio.Event())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=timeout_s)
        run = self.store.get_run(run_id)
        return run.state.value if run else None

    async def read_log(self, attempt_id: str, offset: int = 0) -> bytes:
        return self.store.read_log(attempt_id, offset)

    async def list_runs(self, state: str | None = None, pipeline: str | None = None,
                        limit: int = 50, offset: int = 0) -> list[dict]:
        return runs_page(self.store, state, pipeline, limit, offset)

    async def step_log(self, run_id: str, step: str, attempt: int | None = None,
                       offset: int = 0) -> dict:
        """A step's log from `offset`, with whether more can come: {"error": ...} if unknown."""
        return log_answer(self.store, run_id, step, attempt, offset)

    async def queue(self) -> dict[str, dict]:
        return self.sched.queue_view(time.time())

    async def workers(self, since: float | None = None) -> list[dict]:
        """The live workers and those stopped after `since` (default: the last RECENT_S; the
        store keeps every worker), with the slots in use from the master's memory."""
        out = []
        since = time.time() - RECENT_S if since is None else since
        for w in self.store.list_workers():
            if w.stopped_at is not None and w.stopped_at < since:
                continue
            cpu, running = self.sched.worker_load(w.id)
            out.append({**w.model_dump(mode="json"), "cpus_in_use": cpu, "running": running})
        return out

    async def stats(self) -> dict:
        return {
            "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
            "queued": {pool: view["queued"]
                       for pool, view in self.sched.queue_view(time.time()).items()},
            "active_runs": len(self.sched.runs),
            "workers": {w.id: w.state.value for w in self.sched.workers.values()},
        }

    async def stop_workers(self) -> int:
        """Stop every worker actor (used when a cluster is shut down on purpose)."""
        ids = list(self._handles)
        for worker_id in ids:
            self._kill_worker(worker_id)
        return len(ids)

    async def events(self, after: int = 0, epoch: float | None = None,
                     timeout_s: float = 15.0) -> dict:
        """Run and step changes numbered after `after`, waiting up to `timeout_s` for one.
        From another master's `epoch` (this one restarted since) the numbering starts over:
        `reset` says so, and `gap` that changes were missed (the client reloads its views)."""
        reset = epoch is not None and epoch != self.started_at
        if reset:
            after = 0
        if self._event_seq <= after and not reset:
            self._new_events.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new_events.wait(), timeout=timeout_s)
        found = [e for e in self._events if e["seq"] > after]
        oldest = self._events[0]["seq"] if self._events else self._event_seq + 1
        return {"epoch": self.started_at, "events": found, "reset": reset,
                "gap": bool(after) and after + 1 < oldest}

    def _note_events(self, changes, now: float) -> None:
        # Steps first: a run that ends in this batch ended because of them.
        for step in changes.steps.values():
            self._event("step", {"run_id": step.run_id, "step": step.name,
                                 "state": step.state.value, "attempts": step.attempts,
                                 "worker_id": step.worker_id, "reason": step.reason}, now)
        for run in changes.runs.values():
            self._event("run", {"run_id": run.id, "pipeline": run.pipeline,
                                "state": run.state.value, "reason": run.reason}, now)

    def _event(self, kind: str, data: dict, now: float) -> None:
        self._event_seq += 1
        self._events.append({"seq": self._event_seq, "kind": kind, "at": now, **data})
        self._new_events.set()

    # --- API for workers -----------------------------------------------------------------------

    async def register(self, record: WorkerRecord, running: list[str] | None = None,
                       finished: list[StepOutcome] | None = None) -> float:
        """A worker (re)joins, saying which attempts it runs and which it finished lately.
        Returns this master's epoch, which the worker compares with its tasks'."""
        now = time.time()
        self.sched.register_worker(record, now)
        self.sched.reconcile(record.id, running or [], finished or [], now)
        if record.id not in self._handles:
            self._adopt_handle(record.id)
        self._wake.set()
        return self.started_at

    async def heartbeat(self, worker_id: str, usage: dict[str, float]) -> float | None:
        """This master's epoch, or None when the worker must register (again)."""
        known = self.sched.heartbeat(worker_id, usage, time.time())
        return self.started_at if known else None

    async def report(self, outcome: StepOutcome) -> bool:
        """An outcome sent by its worker rather than returned to the master that dispatched
        it (that master has since restarted). Applied once; acknowledged either way."""
        self._guarded(self.sched.on_outcome, outcome, time.time())
        self._wake.set()
        return True

    async def append_log(self, attempt_id: str, seq: int, data: bytes) -> None:
        self.store.append_log(attempt_id, seq, data)

    async def get_source(self, digest: str) -> bytes | None:
        return self.store.get_source(digest)

    # --- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=TICK_INTERVAL_S)
            self._wake.clear()
            self._guarded(self._tick)

    def _tick(self) -> None:
        now = time.time()
        self.sched.tick(now)
        self._commit()
        # The loop ticks on every outcome; the gauges and the look-ahead scan the queue, so
        # they are refreshed at most once per TICK_INTERVAL_S rather than per outcome.
        if now - self._surveyed_at < TICK_INTERVAL_S:
            return
        self._surveyed_at = now
        counts: dict[tuple[str, str], int] = {}
        for w in self.sched.workers.values():
            counts[(w.pool, w.state.value)] = counts.get((w.pool, w.state.value), 0) + 1
        self.metrics.snapshot(self.sched.queue_view(now), len(self.sched.runs), counts)
        self._look_ahead()
        if self.settings.retention_days and now >= self._collect_at and not self._collecting:
            self._collect_at = now + RETENTION_INTERVAL_S
            self._collecting = True
            asyncio.get_running_loop().create_task(self._collect(now))

    async def _collect(self, now: float) -> None:
        """Delete what is past retention, in a thread: the loop goes on dispatching."""
        try:
            done = await asyncio.to_thread(collect, self.store, now,
                                           self.settings.retention_days * 86400,
                                           max_runs=RETENTION_MAX_RUNS)
            if any(done.as_dict().values()):
                log.warning("retention: deleted %s", done.as_dict())
        except Exception as e:  # retention is housekeeping: never a reason to stop
            log.warning("retention pass failed: %s", e)
        finally:
            self._collecting = False

    def _look_ahead(self) -> None:
        """Ask the autoscaler for the workers the next steps will need (a standing request,
        replaced when it changes and withdrawn when nothing is coming)."""
        wanted = self.sched.lookahead()
        bundles = [worker_bundle(self.settings.pools[pool], self.settings)
                   for pool, count in sorted(wanted.items()) for _ in range(count)]
        if bundles != self._requested:
            self._requested = bundles
            asyncio.get_running_loop().create_task(asyncio.to_thread(_request_capacity,
                                                                     bundles))

    def _guarded(self, fn, *args) -> None:
        """Run a step of the master's own work (not a caller's request). A failure here would
        otherwise die quietly in a background task and leave runs waiting forever; a restart
        rebuilds the master from the store instead."""
        try:
            fn(*args)
        except Exception:
            log.critical("the master failed in %s; restarting from the store", fn.__name__,
                         exc_info=True)
            os._exit(1)

    def _commit(self, idempotency: dict[str, KeyRecord] | None = None) -> None:
        """Write the scheduler's decisions, then carry them out."""
        decisions = self.sched.take()
        decisions.changes.idempotency.update(idempotency or {})
        changes = decisions.changes
        if changes:
            t0 = time.perf_counter()
            try:
                self.store.save(changes)
            except StoreError as e:
                # Memory is now ahead of the truth: restart and rebuild from the store.
                log.critical("store write failed, restarting the master: %s", e)
                os._exit(1)
            self.metrics.committed(len(changes.runs) + len(changes.steps) +
                                   len(changes.attempts) + len(changes.workers),
                                   time.perf_counter() - t0)
        self._note_events(changes, time.time())
        for attempt in changes.attempts.values():
            if attempt.state is not StepState.RUNNING:
                self.metrics.attempt_ended(attempt)
        for run in changes.runs.values():
            if run.state.terminal:
                self.metrics.run_ended(run)
                if run.id in self._finished:
                    self._finished.pop(run.id).set()
        for record in decisions.start_workers:
            self._handles[record.id] = start_worker(record, self.settings)
            asyncio.get_running_loop().create_task(self._watch_start(record.id))
        for worker_id in decisions.stop_workers:
            self._kill_worker(worker_id)
        for worker_id, task in decisions.dispatch:
            self._dispatch(worker_id, task)
        for kill in decisions.kill:
            handle = self._handles.get(kill.worker_id)
            if handle is not None:
                handle.cancel.remote(kill.attempt_id)

    def _dispatch(self, worker_id: str, task: StepTask) -> None:
        handle = self._handles.get(worker_id)
        if handle is None:
            self.sched.worker_lost(worker_id, "no handle to the worker actor", time.time())
            self._wake.set()
            return
        task.master_epoch = self.started_at
        ref = handle.run_step.remote(task)
        asyncio.get_running_loop().create_task(self._await_outcome(worker_id, task, ref))

    async def _await_outcome(self, worker_id: str, task: StepTask, ref) -> None:
        try:
            outcome = await ref
        except RayActorError as e:
            self._guarded(self.sched.worker_lost, worker_id,
                          f"actor died ({type(e).__name__})", time.time())
        except RayError as e:
            self._guarded(self.sched.on_outcome, StepOutcome(
                attempt_id=task.attempt_id, run_id=task.run_id, step=task.step.name,
                state=StepState.FAILED, reason=f"worker error: {e}"), time.time())
        else:
            self._guarded(self.sched.on_outcome, outcome, time.time())
        self._wake.set()

    async def _watch_start(self, worker_id: str) -> None:
        handle = self._handles.get(worker_id)
        try:
            await handle.ready.remote()
        except RayError as e:
            self._guarded(self.sched.worker_lost, worker_id,
                          f"failed to start ({type(e).__name__})", time.time())
            self._wake.set()

    def _adopt_handle(self, worker_id: str) -> None:
        try:
            self._handles[worker_id] = ray.get_actor(worker_actor_name(worker_id),
                                                     namespace=NAMESPACE)
        except ValueError:
            self.sched.worker_lost(worker_id, "its actor no longer exists", time.time())

    def _kill_worker(self, worker_id: str) -> None:
        handle = self._handles.pop(worker_id, None)
        if handle is None:
            try:
                handle = ray.get_actor(worker_actor_name(worker_id), namespace=NAMESPACE)
            except ValueError:
                return
        ray.kill(handle, no_restart=True)

    # --- recovery ------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Rebuild the view from the store; find the live worker actors again by name."""
        runs = self.store.active_runs()
        steps = [s for r in runs for s in self.store.get_steps(r.id)]
        running = {s.run_id for s in steps if s.current_attempt}
        attempts = [a for run_id in running for a in self.store.get_attempts(run_id)]
        workers = self.store.list_workers()
        self.sched.restore(runs, steps, workers, time.time(), attempts)
        for worker_id in list(self.sched.workers):
            self._adopt_handle(worker_id)
        if runs:
            log.warning("master recovered %d active run(s) from the store", len(runs))


def _request_digest(pipeline: dict | str, env: dict[str, str] | None,
                    source: tuple[str, bytes] | None) -> str:
    """What a repeated Idempotency-Key is compared by: the pipeline, env and source."""
    text = json.dumps([pipeline, env or {}, source[0] if source else None], sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _plan(pipeline: dict | str, env: dict[str, str], pools) -> tuple:
    """(spec, planned steps, problems) of a submission: pure, so it runs in a thread."""
    try:
        spec = parse_pipeline(pipeline)
    except SpecError as e:
        return None, [], e.problems
    problems = check_env_overrides(env)
    steps = plan(spec, env) if not problems else []
    return spec, steps, problems + check_fits(steps, pools)


def _request_capacity(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=bundles)
    except Exception as e:  # look-ahead is a hint: never a reason to fail
        log.warning("could not ask the autoscaler for capacity: %s", e)


def _new_run_id(now: float) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + uuid.uuid4().hex[:6]


def master_actor(settings: Settings):
    """The actor class with its options: detached, named, restarted forever, no CPU reserved."""
    return ray.remote(Master).options(
        name=MASTER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, num_cpus=0, max_concurrency=1000,
        resources=dict(settings.master_resources) or None,
    )
