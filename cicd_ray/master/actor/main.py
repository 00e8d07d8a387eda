"""The master actor: a thin shell that runs the core (cicd_ray.master.core) on Ray.

It serves clients, workers and admin calls through the core, and turns the effects the core
commits into Ray calls (cicd_ray.master.actor.workers). If the store cannot be written the
master exits, and Ray restarts it from the store (the store is the truth, this actor's memory
a cache). Its chores (notifications, retention, metrics, look-ahead) and the starts of
webhooks and cron slots are parts of their own, in this folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import psutil
import ray
import ray.util.metrics

from cicd_ray.config import Settings
from cicd_ray.errors import StoreError
from cicd_ray.master.actor.chores import TICK_INTERVAL_S, Chores
from cicd_ray.master.actor.starts import ShellStarts
from cicd_ray.master.actor.workers import WorkerActors
from cicd_ray.master.admission import request_digest
from cicd_ray.master.core import MasterCore
from cicd_ray.master.events import parse_position
from cicd_ray.master.metrics import Metrics
from cicd_ray.names import MASTER_NAME, NAMESPACE
from cicd_ray.protocol import (
    RUN_WAIT_S,
    LogSlice,
    Missing,
    Rejected,
    Reply,
    RunChange,
    RunView,
    StepOutcome,
    SubmitCommand,
)
from cicd_ray.reads.explain import Explanation
from cicd_ray.reads.runs import Reads
from cicd_ray.records import AuditRecord, Caller, RunRecord, WorkerRecord
from cicd_ray.states import WorkerState
from cicd_ray.store import open_store
from cicd_ray.triggers.cron import ScheduleSpec
from cicd_ray.triggers.githosts import Trigger

log = logging.getLogger(__name__)


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


class Master:
    """The master actor: the core on Ray, its loop, and the calls clients and workers make."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(ray.util.metrics)
        self._wake = asyncio.Event()
        self._news = _Signal()
        self.core = MasterCore(settings, open_store(settings.store_url), observers=[self.metrics])
        self.core.events.on_new = self._news.fire
        self.reads = Reads(self.core.store)  # what clients read through the master
        self.actors = WorkerActors(settings, self.core, self._guarded, self._wake)
        self.started_at = self.core.started_at
        self.chores = Chores(settings, self.core, self.metrics, self._guarded)
        self.starts = ShellStarts(settings, self.core, self._guarded, self._wake)
        if self.core.recovered:
            log.warning("master recovered %d active run(s) from the store", self.core.recovered)
        # Find the live worker actors again; one still starting is watched as when it started.
        for worker in list(self.core.sched.workers.values()):
            self.actors.adopt(worker.id, watch=worker.state is WorkerState.STARTING)
        self._act()
        self._loop = asyncio.get_running_loop().create_task(self._run())

    async def ping(self) -> dict:
        return {
            "master": MASTER_NAME,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "pools": sorted(self.settings.pools),
            "store": self.settings.store_url,
            "artifacts": self.settings.artifacts_url,
        }

    async def submit(self, command: SubmitCommand) -> Reply:
        """Validate, store, then answer. The run is durable in the store before its id is
        returned; a submission repeated with its idempotency key answers with the first run."""
        c = command
        request = request_digest(c.pipeline, c.env, c.source, list(c.secrets))
        known = self.core.submissions.known_key(c.idempotency_key, request)
        if known is not None:
            return known
        # Parsing and planning a large document takes time: off the loop that dispatches.
        planned = await asyncio.to_thread(
            self.core.submissions.plan,
            c.pipeline,
            c.env,
            c.source,
            request,
            c.secrets,
            c.project,
            c.caller.api,
        )
        accept = self.core.submissions.accept
        answer = self._guarded(accept, planned, c.source, c.idempotency_key, c.secrets, c.caller)
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
        return self.reads.run(run_id)

    async def explain(self, run_id: str, step: str) -> Explanation | Missing:
        """Why a step ran instead of being reused (see cicd_ray.reads.explain)."""
        return self.reads.explain(run_id, step)

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
    ) -> list[RunRecord]:
        return self.reads.runs(state, pipeline, limit, offset, project)

    async def project_of(self, run_id: str) -> str | None:
        return self.reads.project_of(run_id)

    async def audit(self, limit: int = 100, offset: int = 0) -> list[AuditRecord]:
        return self.reads.audit(limit, offset)

    async def step_log(
        self, run_id: str, step: str, attempt: int | None = None, offset: int = 0
    ) -> LogSlice | Missing:
        """A step's log from `offset`, with whether more can come."""
        return self.reads.step_log(run_id, step, attempt, offset)

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

    # Runs started without a person (cicd_ray.master.actor.starts).

    async def trigger(self, repo_name: str, trigger: Trigger) -> Reply:
        return await self.starts.trigger(repo_name, trigger)

    async def schedules(self, project: str | None = None) -> list[dict]:
        return await self.starts.schedules(project)

    async def add_schedule(self, spec: ScheduleSpec, project: str) -> dict | Rejected:
        return await self.starts.add_schedule(spec, project)

    async def delete_schedule(self, project: str, name: str) -> bool:
        return await self.starts.delete_schedule(project, name)

    # What workers call.

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

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=TICK_INTERVAL_S)
            self._wake.clear()
            self._guarded(self._tick)

    def _tick(self) -> None:
        self.core.tick()
        for record, slot in self.core.starts.due_schedules():
            asyncio.get_running_loop().create_task(self.starts.fire(record, slot))
        self.chores.tick()

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
