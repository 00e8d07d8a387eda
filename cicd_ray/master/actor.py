"""The master actor: a thin shell that runs the core (cicd_ray.master.core) on Ray.

It serves clients, workers and admin calls through the core, and turns the effects the core
commits into Ray calls: worker actors started and killed, steps dispatched, attempts cancelled.
If the store cannot be written the master exits, and Ray restarts it from the store (the store
is the truth, this actor's memory a cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import psutil
import ray
import ray.util.metrics
from ray.exceptions import RayActorError, RayError

from cicd_ray.config import Settings
from cicd_ray.errors import StoreError
from cicd_ray.master.admission import request_digest
from cicd_ray.master.core import MasterCore
from cicd_ray.master.events import parse_position
from cicd_ray.master.metrics import Metrics
from cicd_ray.master.starts import MasterStarts
from cicd_ray.names import MASTER_NAME, NAMESPACE, worker_actor_name
from cicd_ray.notify.webhooks import TargetRefused, project_key, send
from cicd_ray.protocol import (
    RUN_WAIT_S,
    LogSlice,
    Missing,
    Rejected,
    Reply,
    RunChange,
    RunView,
)
from cicd_ray.reads.explain import Explanation, explain_answer
from cicd_ray.records import Caller, DeliveryRecord, StepOutcome, StepTask, WorkerRecord
from cicd_ray.scheduler import Effects
from cicd_ray.secrets import SecretError
from cicd_ray.states import StepState, WorkerState
from cicd_ray.store import audit_page, log_answer, open_store, run_project, run_view, runs_page
from cicd_ray.store.blobs import ArtifactStore
from cicd_ray.store.retention import collect
from cicd_ray.worker.actor import start_worker, worker_bundle

log = logging.getLogger(__name__)

TICK_INTERVAL_S = 0.5  # the longest the master sleeps when nothing happens
RETENTION_INTERVAL_S = 3600.0  # how often old runs, logs and sources are deleted
RETENTION_FIRST_S = 60.0  # the first time, this long after the master starts
RETENTION_MAX_RUNS = 5000  # runs deleted per pass: a backlog goes in bounded steps


class _Signal:
    """Wakes every waiter at once (an asyncio.Event cleared by one waiter would not)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout=max(0.0, timeout_s))


class Master(MasterStarts):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(ray.util.metrics)
        self._wake = asyncio.Event()
        self._news = _Signal()
        self._requested: list[dict[str, float]] = []
        self._surveyed_at = 0.0
        self._collecting = False
        self._delivering = False
        self.core = MasterCore(settings, open_store(settings.store_url), observers=[self.metrics])
        self.core.events.on_new = self._news.fire
        self.actors = WorkerActors(settings, self.core, self._guarded, self._wake)
        self.started_at = self.core.started_at
        self._collect_at = self.started_at + RETENTION_FIRST_S
        if self.core.recovered:
            log.warning("master recovered %d active run(s) from the store", self.core.recovered)
        # Find the live worker actors again; one still starting is watched as when it started.
        for worker in list(self.core.sched.workers.values()):
            self.actors.adopt(worker.id, watch=worker.state is WorkerState.STARTING)
        self._act()
        self._loop = asyncio.get_running_loop().create_task(self._run())

    # --- API for clients -----------------------------------------------------------------------

    async def ping(self) -> dict:
        return {
            "master": MASTER_NAME,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "pools": sorted(self.settings.pools),
            "store": self.settings.store_url,
            "artifacts": self.settings.artifacts_url,
        }

    async def submit(
        self,
        pipeline: dict | str,
        env: dict[str, str] | None = None,
        source: tuple[str, bytes] | None = None,
        idempotency_key: str | None = None,
        secrets: dict[str, str] | None = None,
        caller: Caller | None = None,
        project: str = "default",
    ) -> Reply:
        """Validate, store, then answer. The run is durable in the store before its id is
        returned; a submission repeated with its idempotency key answers with the first run.
        `secrets`: the submission's own, stored apart from the run; `caller`: who submits
        (audited); `project`: whose run it is."""
        request = request_digest(pipeline, env, source, list(secrets or {}))
        known = self.core.submissions.known_key(idempotency_key, request)
        if known is not None:
            return known
        # Parsing and planning a large document takes time: off the loop that dispatches.
        planned = await asyncio.to_thread(
            self.core.submissions.plan,
            pipeline,
            env,
            source,
            request,
            secrets,
            project,
            bool(caller and caller.api),
        )
        answer = self._guarded(
            self.core.submissions.accept, planned, source, idempotency_key, secrets, caller
        )
        self._wake.set()  # dispatch its first steps now, not at the next idle tick
        return answer

    async def cancel(self, run_id: str, caller: Caller | None = None) -> str | None:
        """Cancel a run; idempotent. Returns the run's state, or None for an unknown run."""
        return self._guarded(self.core.cancel, run_id, caller)

    async def rerun(
        self, run_id: str, only_failed: bool = False, caller: Caller | None = None
    ) -> Reply | None:
        """A new run of a finished one (of its failed part, with `only_failed`); None for an
        unknown run."""
        answer = self._guarded(self.core.submissions.rerun, run_id, only_failed, caller)
        self._wake.set()
        return answer

    async def approve(
        self,
        run_id: str,
        step: str,
        approved: bool,
        by: str,
        comment: str = "",
        caller: Caller | None = None,
    ) -> str | Rejected | Missing:
        """Release or reject a step waiting for approval (see MasterCore.approve)."""
        answer = self._guarded(self.core.approve, run_id, step, approved, by, comment, caller)
        self._wake.set()
        return answer

    async def get_run(self, run_id: str) -> RunView | None:
        return run_view(self.core.store, run_id)

    async def explain(self, run_id: str, step: str) -> Explanation | Missing:
        """Why a step ran instead of being reused (see cicd_ray.reads.explain)."""
        return explain_answer(self.core.store, run_id, step)

    async def wait(
        self,
        run_id: str,
        after: str | None = None,
        timeout_s: float = RUN_WAIT_S,
        until_end: bool = False,
    ) -> RunChange | None:
        """A long poll: answers once the run has changed since `after` (a position from an
        earlier answer) or has ended, or after `timeout_s`; with `until_end`, only once it has
        ended (or after `timeout_s`). Without `after`, at once, with where to wait from. None
        for an unknown run."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        epoch, seq = parse_position(after)
        events = self.core.events
        run = self.core.store.get_run(run_id)
        while run is not None:
            read_at = events.seq
            changed = events.run_changed(run_id, seq, epoch, itself=until_end)
            if after is None or run.state.terminal or loop.time() >= deadline or changed:
                return RunChange(run_id=run_id, state=run.state.value, position=events.position)
            await self._news.wait(deadline - loop.time())
            if events.run_changed(run_id, read_at, events.epoch, itself=True):
                run = self.core.store.get_run(run_id)  # read again only when the run changed
        return None

    async def read_log(self, attempt_id: str, offset: int = 0) -> bytes:
        return self.core.store.read_log(attempt_id, offset)

    async def list_runs(
        self,
        state: str | None = None,
        pipeline: str | None = None,
        limit: int = 50,
        offset: int = 0,
        project: str | None = None,
    ) -> list[dict]:
        return runs_page(self.core.store, state, pipeline, limit, offset, project)

    async def project_of(self, run_id: str) -> str | None:
        return run_project(self.core.store, run_id)

    async def audit(self, limit: int = 100, offset: int = 0) -> list[dict]:
        return audit_page(self.core.store, limit, offset)

    async def step_log(
        self, run_id: str, step: str, attempt: int | None = None, offset: int = 0
    ) -> LogSlice | Missing:
        """A step's log from `offset`, with whether more can come."""
        return log_answer(self.core.store, run_id, step, attempt, offset)

    async def queue(self) -> dict[str, dict]:
        return self.core.queue_view()

    async def workers(self, since: float | None = None, project: str | None = None) -> list[dict]:
        """The live workers and those stopped after `since` (default: lately); with a
        `project`, only its attempts are named among those they run."""
        return self.core.workers_view(since, project)

    async def stats(self) -> dict:
        return {
            "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
            "queued": {pool: view["queued"] for pool, view in self.core.queue_view().items()},
            "active_runs": len(self.core.sched.runs),
            "workers": {w.id: w.state.value for w in self.core.sched.workers.values()},
        }

    async def stop_workers(self) -> int:
        """Stop every worker actor (used when a cluster is shut down on purpose)."""
        return self.actors.kill_all()

    async def events(
        self, after: int = 0, epoch: float | None = None, timeout_s: float = 15.0
    ) -> dict:
        """Run and step changes numbered after `after`, waiting up to `timeout_s` for one
        (see cicd_ray.master.events)."""
        if not self.core.events.has_news(after, epoch):
            await self._news.wait(timeout_s)
        return self.core.events.page(after, epoch)

    # --- API for workers -----------------------------------------------------------------------

    async def register(
        self,
        record: WorkerRecord,
        running: list[str] | None = None,
        finished: list[StepOutcome] | None = None,
    ) -> float:
        """A worker (re)joins, saying which attempts it runs and which it finished lately.
        Returns this master's epoch, which the worker compares with its tasks'."""
        epoch = self._guarded(self.core.register, record, running, finished)
        self.actors.adopt(record.id)
        self._wake.set()
        return epoch

    async def heartbeat(self, worker_id: str, usage: dict[str, float]) -> float | None:
        """This master's epoch, or None when the worker must register (again)."""
        return self.core.heartbeat(worker_id, usage)

    async def report(self, outcome: StepOutcome) -> bool:
        """An outcome sent by its worker rather than returned to the master that dispatched
        it (that master has since restarted). Applied once; acknowledged either way."""
        self._guarded(self.core.report, outcome)
        self._wake.set()
        return True

    async def append_log(self, attempt_id: str, seq: int, data: bytes) -> None:
        self.core.append_log(attempt_id, seq, data)

    async def get_source(self, digest: str) -> bytes | None:
        return self.core.store.get_source(digest)

    # --- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=TICK_INTERVAL_S)
            self._wake.clear()
            self._guarded(self._tick)

    def _tick(self) -> None:
        self.core.tick()
        for record, slot in self.core.starts.due_schedules():
            asyncio.get_running_loop().create_task(self._fire(record, slot))
        if not self._delivering:
            due = self.core.outbox.take_due(self.core.clock())
            if due:
                self._delivering = True
                asyncio.get_running_loop().create_task(self._deliver(due))
        now = self.core.clock()
        # The loop ticks on every outcome; the gauges and the look-ahead scan the queue, so
        # they are refreshed at most once per TICK_INTERVAL_S rather than per outcome.
        if now - self._surveyed_at < TICK_INTERVAL_S:
            return
        self._surveyed_at = now
        counts: dict[tuple[str, str], int] = {}
        for w in self.core.sched.workers.values():
            counts[(w.pool, w.state.value)] = counts.get((w.pool, w.state.value), 0) + 1
        self.metrics.snapshot(
            self.core.queue_view(),
            len(self.core.sched.runs),
            counts,
            {p.name: p.max_workers for p in self.settings.pools.values()},
            self.started_at,
        )
        self._look_ahead()
        if self.settings.retention_days and now >= self._collect_at and not self._collecting:
            self._collect_at = now + RETENTION_INTERVAL_S
            self._collecting = True
            asyncio.get_running_loop().create_task(self._collect(now))

    async def _collect(self, now: float) -> None:
        """Delete what is past retention, in a thread: the loop goes on dispatching."""
        try:
            done = await asyncio.to_thread(
                collect,
                self.core.store,
                now,
                self.settings.retention_days * 86400,
                max_runs=RETENTION_MAX_RUNS,
                artifacts=ArtifactStore(self.settings.artifacts_url),
            )
            if any(done.as_dict().values()):
                log.warning("retention: deleted %s", done.as_dict())
        except Exception as e:  # retention is housekeeping: never a reason to stop
            log.warning("retention pass failed: %s", e)
        finally:
            self._collecting = False

    async def _deliver(self, due: list[DeliveryRecord]) -> None:
        """Try the notifications due, each in a thread (a slow receiver holds up no other)."""
        try:
            await asyncio.gather(*(self._deliver_one(d) for d in due))
        finally:
            self._delivering = False

    async def _deliver_one(self, d: DeliveryRecord) -> None:
        try:
            body = await asyncio.to_thread(self.core.delivery_body, d)
            extra = await asyncio.to_thread(self.core.delivery_headers, d)
            key = ""
            if d.kind == "notify" and self.settings.webhook_secret:  # the run's project's key
                run = await asyncio.to_thread(self.core.store.get_run, d.run_id)
                key = project_key(self.settings.webhook_secret, run.project)
            status = await asyncio.to_thread(
                send, d.url, body, key, d.id, self.settings.webhook_allow, extra=extra
            )
        except (TargetRefused, SecretError) as e:
            self._guarded(self.core.delivery_done, d.id, None, str(e), True)
        except Exception as e:  # no answer: tried again later, within the delivery window
            self._guarded(self.core.delivery_done, d.id, None, f"{type(e).__name__}: {e}")
        else:
            self._guarded(self.core.delivery_done, d.id, status)

    def _look_ahead(self) -> None:
        """Ask the autoscaler for the workers the next steps will need (a standing request,
        replaced when it changes and withdrawn when nothing is coming)."""
        wanted = self.core.sched.lookahead()
        bundles = [
            worker_bundle(self.settings.pools[pool], self.settings)
            for pool, count in sorted(wanted.items())
            for _ in range(count)
        ]
        if bundles != self._requested:
            self._requested = bundles
            asyncio.get_running_loop().create_task(asyncio.to_thread(_request_capacity, bundles))

    def _guarded(self, fn, *args):
        """Run the core, then carry out what it committed. A failed store write, or any
        failure of the master's own work, would leave memory ahead of the store or die quietly
        in a background task: the master exits instead and is rebuilt from the store."""
        try:
            answer = fn(*args)
            self._act()
        except StoreError as e:
            log.critical("store write failed, restarting the master: %s", e)
            os._exit(1)
        except Exception:
            log.critical(
                "the master failed in %s; restarting from the store", fn.__name__, exc_info=True
            )
            os._exit(1)
        return answer

    def _act(self) -> None:
        self.actors.carry_out(self.core.take_effects())


class WorkerActors:
    """The worker actors, as the master reaches them: started, found again by name, given
    steps, told to cancel, killed. What they answer (or their death) goes to the core through
    `guarded`, which also carries out what the core then commits."""

    def __init__(self, settings: Settings, core: MasterCore, guarded, wake: asyncio.Event) -> None:
        self.settings = settings.for_workers()
        self.core = core
        self._guarded = guarded
        self._wake = wake
        self._handles: dict[str, ray.actor.ActorHandle] = {}

    def carry_out(self, effects: Effects) -> None:
        for record in effects.start_workers:
            self._handles[record.id] = start_worker(record, self.settings)
            asyncio.get_running_loop().create_task(self._watch_start(record.id))
        for worker_id in effects.stop_workers:
            self.kill(worker_id)
        for worker_id, task in effects.dispatch:
            self._dispatch(worker_id, task)
        for kill in effects.kill:
            handle = self._handles.get(kill.worker_id)
            if handle is not None:
                handle.cancel.remote(kill.attempt_id)

    def _dispatch(self, worker_id: str, task: StepTask) -> None:
        handle = self._handles.get(worker_id)
        if handle is None:
            self._lost_later(worker_id, "no handle to the worker actor")
            return
        task.master_epoch = self.core.started_at
        ref = handle.run_step.remote(task)
        asyncio.get_running_loop().create_task(self._await_outcome(worker_id, task, ref))

    def _lost_later(self, worker_id: str, reason: str) -> None:
        """A worker found lost while effects are carried out: the core hears of it next."""
        asyncio.get_running_loop().call_soon(
            self._guarded, self.core.worker_lost, worker_id, reason
        )

    async def _await_outcome(self, worker_id: str, task: StepTask, ref) -> None:
        try:
            outcome = await ref
        except RayActorError as e:
            self._guarded(self.core.worker_lost, worker_id, f"actor died ({type(e).__name__})")
        except RayError as e:
            self._guarded(
                self.core.report,
                StepOutcome(
                    attempt_id=task.attempt_id,
                    run_id=task.run_id,
                    step=task.step.name,
                    state=StepState.FAILED,
                    reason=f"worker error: {e}",
                ),
            )
        else:
            self._guarded(self.core.report, outcome)
        self._wake.set()

    async def _watch_start(self, worker_id: str) -> None:
        handle = self._handles.get(worker_id)
        try:
            await handle.ready.remote()
        except RayError as e:
            self._guarded(self.core.worker_lost, worker_id, f"failed to start ({type(e).__name__})")
            self._wake.set()

    def adopt(self, worker_id: str, watch: bool = False) -> None:
        """Find a worker actor by its name (after a master restart, or when it registers);
        `watch` one still starting: it is lost if it fails to start."""
        if worker_id in self._handles:
            return
        try:
            self._handles[worker_id] = ray.get_actor(
                worker_actor_name(worker_id), namespace=NAMESPACE
            )
        except ValueError:
            self._lost_later(worker_id, "its actor no longer exists")
            return
        if watch:
            asyncio.get_running_loop().create_task(self._watch_start(worker_id))

    def kill(self, worker_id: str) -> None:
        handle = self._handles.pop(worker_id, None)
        if handle is None:
            try:
                handle = ray.get_actor(worker_actor_name(worker_id), namespace=NAMESPACE)
            except ValueError:
                return
        ray.kill(handle, no_restart=True)

    def kill_all(self) -> int:
        ids = list(self._handles)
        for worker_id in ids:
            self.kill(worker_id)
        return len(ids)


def _request_capacity(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=bundles)
    except Exception as e:  # look-ahead is a hint: never a reason to fail
        log.warning("could not ask the autoscaler for capacity: %s", e)


def master_actor(settings: Settings):
    """The actor class with its options: detached, named, restarted forever, no CPU reserved."""
    return ray.remote(Master).options(
        name=MASTER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
        max_concurrency=1000,
        resources=dict(settings.master_resources) or None,
    )
