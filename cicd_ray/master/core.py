"""The master's core, with no Ray in it: the store, an injected clock, the scheduler, and its
parts: submissions, the starts of webhooks and slots, the committer and its observers (the
outbox, the log budget, a run's own secrets, the event log that wakes the long polls, the
metrics).

Every change goes the same way: the scheduler decides, the committer writes the records to the
store in one batch, tells the observers, and keeps the effects to carry out (dispatch, kill,
start and stop workers) — only after the write. If the write fails nothing is carried out and
the error is raised: memory is now ahead of the store, so the core must be dropped and rebuilt
from the store (the actor exits and Ray restarts it). The actor (cicd_ray.master.actor) is a
shell that turns effects into Ray calls; cicd_ray.testing.inline carries them out in-process for
tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cicd_ray.config import Settings
from cicd_ray.master.commit import Committer, Observer
from cicd_ray.master.crontable import Timetable
from cicd_ray.master.events import EventLog
from cicd_ray.master.logbudget import LogBudget
from cicd_ray.master.outbox import Outbox
from cicd_ray.master.ownsecrets import OwnSecrets
from cicd_ray.master.starts import Starts
from cicd_ray.master.submissions import Submissions, audit
from cicd_ray.protocol import Missing, Rejected, Reply, SourceRef, StepOutcome
from cicd_ray.records import Caller, Changes, WorkerRecord
from cicd_ray.scheduler import Scheduler
from cicd_ray.scheduler.share import Share
from cicd_ray.store import Store
from cicd_ray.store.blobs import ArtifactStore

RECENT_S = 600.0  # stopped workers shown for this long
Clock = Callable[[], float]


class MasterCore:
    """One master's state and policy, without Ray: what the actor runs and what the inline
    driver runs in tests. Requests come in as method calls; what they change is committed in
    one batch per call, before any effect is carried out."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        clock: Clock = time.time,
        observers: list[Observer] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.started_at = clock()
        self.sched = Scheduler(
            settings.pools,
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
            lookahead=settings.lookahead,
            artifact_run_max_bytes=settings.artifact_run_max_bytes,
            results=store.get_result,
            share=Share(settings.projects, settings.fair_share),
        )
        self.outbox = Outbox(store, settings)
        self.timetable = Timetable(store, settings)
        self.events = EventLog(self.started_at)
        self.log_budget = LogBudget(settings.log_run_max_bytes)
        self.own_secrets = OwnSecrets(store, self.sched)
        parts = [self.log_budget, self.outbox, self.own_secrets, self.events]
        self.committer = Committer(store, self.sched, clock, [*parts, *(observers or [])])
        self.commit = self.committer.commit
        self.take_effects = self.committer.take_effects
        self.blobs = ArtifactStore(settings.artifacts_url)  # snapshots, artifacts, caches
        self.submissions = Submissions(
            settings,
            store,
            self.sched,
            clock,
            self.committer,
            self.outbox,
            self.timetable,
            self.blobs,
        )
        self.starts = Starts(settings, clock, self.timetable, self.submissions, self.committer)
        self.recovered = self._recover()

    # --- runs ----------------------------------------------------------------------------------

    def submit(
        self,
        pipeline: dict | str,
        env: dict[str, str] | None = None,
        source: SourceRef | None = None,
        key: str | None = None,
        secrets: dict[str, str] | None = None,
        caller: Caller | None = None,
        project: str = "default",
    ) -> Reply:
        """Plan and accept a submission in one call (`Submissions.submit`)."""
        return self.submissions.submit(pipeline, env, source, key, secrets, caller, project)

    def append_log(self, attempt_id: str, seq: int, data: bytes) -> None:
        """A chunk of a running attempt's log, stored as far as its run's budget allows."""
        kept = self.log_budget.admit(attempt_id, data)
        if kept:
            self.store.append_log(attempt_id, seq, kept)

    def cancel(self, run_id: str, caller: Caller | None = None) -> str | None:
        """Cancel a run; idempotent. The run's state, or None for an unknown run."""
        run = self.sched.cancel(run_id, self.clock())
        if run is None:
            stored = self.store.get_run(run_id)
            return stored.state.value if stored else None
        self.commit(Changes(audit=[audit(caller, "cancel", run, self.clock())]))
        return run.state.value

    def approve(
        self,
        run_id: str,
        step: str,
        approved: bool,
        by: str,
        comment: str = "",
        caller: Caller | None = None,
    ) -> str | Rejected | Missing:
        """Answer a step waiting for approval: the step's new state, Rejected when it is not
        waiting, Missing for an unknown run or step."""
        run = self.sched.runs.get(run_id) or self.store.get_run(run_id)
        if run is None:
            return Missing(detail=f"run {run_id!r} not found")
        active = run_id in self.sched.steps
        if active:
            names = self.sched.steps[run_id]
        else:
            names = {s.name for s in self.store.get_steps(run_id)}
        if step not in names:
            return Missing(detail=f"run {run_id} has no step {step!r}")
        if not active:
            ended = f"run {run_id} has ended ({run.state.value}): nothing of it waits for approval"
            return Rejected(problems=[ended])
        problem = self.sched.approve(run_id, step, approved, by, comment, self.clock())
        if problem:
            return Rejected(problems=[problem])
        action = "approve" if approved else "reject"
        record = audit(caller, action, run, self.clock(), step, detail=f"by {by}")
        self.commit(Changes(audit=[record]))
        found = self.sched.book.step(run_id, step) or next(
            s for s in self.store.get_steps(run_id) if s.name == step
        )  # its run has ended
        return found.state.value

    def delivery_done(
        self, delivery_id: str, status: int | None, error: str = "", final: bool = False
    ) -> None:
        """A notification was tried: settled, or due again later (`Outbox.settle`)."""
        self.outbox.settle(delivery_id, status, error, self.clock(), final)

    # --- workers -------------------------------------------------------------------------------

    def register(
        self,
        record: WorkerRecord,
        running: list[str] | None = None,
        finished: list[StepOutcome] | None = None,
    ) -> float:
        """A worker (re)joins, saying which attempts it runs and which it finished lately.
        Returns this master's epoch, which the worker compares with its tasks'."""
        now = self.clock()
        self.sched.register_worker(record, now)
        self.sched.reconcile(record.id, running or [], finished or [], now)
        self.commit()
        return self.started_at

    def heartbeat(self, worker_id: str, usage: dict[str, float]) -> float | None:
        """This master's epoch, or None when the worker must register (again)."""
        known = self.sched.heartbeat(worker_id, usage, self.clock())
        return self.started_at if known else None

    def report(self, outcome: StepOutcome) -> bool:
        """Apply an attempt's outcome once: False for a stale or repeated one. Not committed
        here: the next `tick` writes the outcomes that arrived together in one batch (when
        hundreds of short steps end at once, the master stays off their critical path)."""
        return self.sched.on_outcome(outcome, self.clock())

    def worker_lost(self, worker_id: str, reason: str) -> None:
        self.sched.worker_lost(worker_id, reason, self.clock())
        self.commit()

    def tick(self) -> None:
        """Notice silent workers, size the pools, place ready steps."""
        self.sched.tick(self.clock())
        self.commit()

    # --- reads only the master can answer --------------------------------------------------------

    def workers_view(self, since: float | None = None, project: str | None = None) -> list[dict]:
        """The live workers and those stopped after `since` (default: the last RECENT_S), with
        the slots in use from memory; with a `project`, the attempts of other projects' runs
        are not named (only counted in the CPUs in use)."""
        since = self.clock() - RECENT_S if since is None else since
        out = []
        for w in self.store.list_workers():
            if w.stopped_at is None or w.stopped_at >= since:
                cpu, running = self.sched.worker_load(w.id)
                if project is not None:
                    running = [a for a in running if self._project_of(a) == project]
                out.append({**w.model_dump(mode="json"), "cpus_in_use": cpu, "running": running})
        return out

    def _project_of(self, attempt_id: str) -> str | None:
        run = self.sched.runs.get(attempt_id.split("/", 1)[0])
        return run.project if run else None

    def queue_view(self) -> dict[str, dict]:
        return self.sched.queue_view(self.clock())

    # --- recovery ------------------------------------------------------------------------------

    def _recover(self) -> int:
        """Rebuild the scheduler's view from the store; the number of active runs taken up."""
        runs = self.store.active_runs()
        steps = [s for r in runs for s in self.store.get_steps(r.id)]
        running = {s.run_id for s in steps if s.current_attempt}
        attempts = [a for run_id in running for a in self.store.get_attempts(run_id)]
        self.sched.restore(runs, steps, self.store.list_workers(), self.clock(), attempts)
        self.own_secrets.recover([r.id for r in runs])
        self.outbox.recover(self.clock())
        self.commit(self.timetable.sync(self.clock()))
        return len(runs)
