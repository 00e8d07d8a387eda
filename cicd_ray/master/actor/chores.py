"""The master's chores, done from its loop without holding it up: the survey (the metrics'
gauges and the look-ahead's request for capacity, at most once per TICK_INTERVAL_S), the
notifications due (each sent in a thread), and retention (in a thread, once an hour).
"""

from __future__ import annotations

import asyncio
import logging

from cicd_ray.config import Settings
from cicd_ray.master.actor.workers import request_capacity
from cicd_ray.master.core import MasterCore
from cicd_ray.master.metrics import Metrics
from cicd_ray.notify.webhooks import TargetRefused, project_key, send
from cicd_ray.records import DeliveryRecord
from cicd_ray.secrets import SecretError
from cicd_ray.store.retention import collect
from cicd_ray.worker.actor import worker_bundle

log = logging.getLogger(__name__)

TICK_INTERVAL_S = 0.5  # the longest the master sleeps when nothing happens
RETENTION_INTERVAL_S = 3600.0  # how often old runs, logs and sources are deleted
RETENTION_FIRST_S = 60.0  # the first time, this long after the master starts
RETENTION_MAX_RUNS = 5000  # runs deleted per pass: a backlog goes in bounded steps


class Chores:
    """What the master does besides answering and dispatching; `guarded` runs a call into the
    core and carries out what it commits."""

    def __init__(self, settings: Settings, core: MasterCore, metrics: Metrics, guarded) -> None:
        self.settings = settings
        self.core = core
        self.metrics = metrics
        self._guarded = guarded
        self._requested: list[dict[str, float]] = []
        self._surveyed_at = 0.0
        self._collecting = False
        self._delivering = False
        self._collect_at = core.started_at + RETENTION_FIRST_S

    def tick(self) -> None:
        """The chores that are due, started from the master's loop."""
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
        self._survey()
        if self.settings.retention_days and now >= self._collect_at and not self._collecting:
            self._collect_at = now + RETENTION_INTERVAL_S
            self._collecting = True
            asyncio.get_running_loop().create_task(self._collect(now))

    def _survey(self) -> None:
        counts: dict[tuple[str, str], int] = {}
        for w in self.core.sched.workers.values():
            counts[(w.pool, w.state.value)] = counts.get((w.pool, w.state.value), 0) + 1
        self.metrics.snapshot(
            self.core.queue_view(),
            len(self.core.sched.runs),
            counts,
            {p.name: p.max_workers for p in self.settings.pools.values()},
            self.core.started_at,
        )
        self._look_ahead()

    async def _collect(self, now: float) -> None:
        """Delete what is past retention, in a thread: the loop goes on dispatching."""
        try:
            done = await asyncio.to_thread(
                collect,
                self.core.store,
                now,
                self.settings.retention_days * 86400,
                max_runs=RETENTION_MAX_RUNS,
                artifacts=self.core.blobs,
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
            body = await asyncio.to_thread(self.core.outbox.body, d)
            extra = await asyncio.to_thread(self.core.outbox.headers, d)
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
            asyncio.get_running_loop().create_task(asyncio.to_thread(request_capacity, bundles))
