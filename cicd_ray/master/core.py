"""The master's core, with no Ray in it: the store, an injected clock, the scheduler, and the
observers of what is committed (the event log, which wakes the long polls; the metrics).

Every change goes the same way: the scheduler decides, `commit()` writes the records to the
store in one batch, tells the observers, and returns the effects to carry out (dispatch, kill,
start and stop workers) — only after the write. If the write fails nothing is carried out and
the error is raised: memory is now ahead of the store, so the core must be dropped and rebuilt
from the store (the actor exits and Ray restarts it). The actor (cicd_ray.master) is a shell
that turns effects into Ray calls; cicd_ray.testing.inline carries them out in-process for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from cicd_ray.config import Settings
from cicd_ray.master.admission import Planned, Source, new_run_id, plan_submission
from cicd_ray.master.crontable import Timetable
from cicd_ray.master.events import EventLog
from cicd_ray.master.logbudget import LogBudget
from cicd_ray.master.outbox import Outbox
from cicd_ray.master.starts import CoreStarts
from cicd_ray.pipeline.model import GitSource
from cicd_ray.protocol import Conflict, Missing, OverQuota, Rejected, Reply, Submitted
from cicd_ray.records import (
    AuditRecord,
    Caller,
    Changes,
    DeliveryRecord,
    KeyRecord,
    RunRecord,
    RunSecrets,
    StepOutcome,
    WorkerRecord,
)
from cicd_ray.scheduler import Effects, Scheduler
from cicd_ray.scheduler.runbook import failed_part
from cicd_ray.scheduler.share import Share
from cicd_ray.states import RunState
from cicd_ray.store import Store
from cicd_ray.triggers.cron import ScheduleRecord

RECENT_S = 600.0  # stopped workers shown for this long
Clock = Callable[[], float]


class Observer(Protocol):
    def committed(self, changes: Changes, took_s: float, now: float) -> None:
        """Called after each batch is written, with what it changed."""


class MasterCore(CoreStarts):
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
        self.observers: list[Observer] = [self.events, *(observers or [])]
        self._effects = Effects()
        # Runs holding secrets of their own, and the names: dropped once no step that lists
        # one can run again (not only when the run ends).
        self._own_secrets: dict[str, set[str]] = {}
        self.log_budget = LogBudget(settings.log_run_max_bytes)
        self.recovered = self._recover()

    # --- submissions ---------------------------------------------------------------------------

    def plan(
        self,
        pipeline: dict | str,
        env: dict[str, str] | None = None,
        source: Source | None = None,
        request: str | None = None,
        secrets: dict[str, str] | None = None,
        project: str = "default",
        from_api: bool = False,
    ) -> Planned:
        """Check and plan a submission; pure, so the shell runs it in a thread. `request`: its
        digest, when the caller has it already; `secrets`: the submission's own; `project`:
        whose run it is to be; `from_api`: sent through the HTTP API (its git source must name
        a public host, or one CICD_RAY_GIT_ALLOW lists)."""
        return plan_submission(
            pipeline,
            env or {},
            source,
            self.settings,
            request,
            secrets=secrets or {},
            project=project,
            git_allow=self.settings.git_allow if from_api else None,
        )

    def known_key(self, key: str | None, request: str) -> Reply | None:
        """The answer to an Idempotency-Key already used: its run, or a conflict."""
        known = self.store.get_key(key) if key else None
        if known is None:
            return None
        if known.request and known.request != request:
            return Conflict(run_id=known.run_id)
        return Submitted(run_id=known.run_id, existing=True)

    def accept(
        self,
        planned: Planned,
        source: Source | None = None,
        key: str | None = None,
        secrets: dict[str, str] | None = None,
        caller: Caller | None = None,
        schedule: ScheduleRecord | None = None,
    ) -> Reply:
        """Store the run, then answer: it is durable before its id is returned. `schedule`:
        the schedule whose slot started it, written with it (each slot: exactly one run)."""
        if planned.problems:
            return Rejected(problems=planned.problems)
        # The same key may have been used while this one was planned.
        answer = self.known_key(key, planned.request) or self._over_quota(planned.project)
        if answer is not None:
            return answer
        now = self.clock()
        spec = planned.spec
        git = spec.source if isinstance(spec.source, GitSource) else None
        run = RunRecord(
            id=new_run_id(now),
            seq=self.store.next_run_seq(),
            pipeline=spec.name,
            created_at=now,
            source_digest=source[0] if source else None,
            source_git=None if source else git,
            commit=None if source else planned.commit,
            branch="" if source else planned.branch,
            concurrency=planned.concurrency,
            notify=spec.notify,
            project=planned.project,
            event=planned.event,
            pr=planned.pr,
            fork=planned.fork,
            repo=planned.repo,
            scheduled_for=planned.scheduled_for,
        )
        if source is not None:
            self.store.put_source(*source, at=now)
        self.sched.submit(run, planned.steps, now)
        extra = Changes(audit=[self._audit(caller, "submit", run)])
        if key:
            extra.idempotency[key] = KeyRecord(run_id=run.id, request=planned.request, at=now)
        if secrets:  # stored apart, with the run, before its id is returned
            extra.run_secrets[run.id] = RunSecrets(values=secrets)
        self.outbox.record_status(run, extra, now)  # pending, for a repository's webhook run
        if schedule is not None:
            schedule.last_run, schedule.last_error = run.id, ""
            extra.schedules[schedule.id] = schedule
            self.timetable.fired(schedule)
        self.commit(extra)
        return Submitted(run_id=run.id)

    def submit(
        self,
        pipeline: dict | str,
        env: dict[str, str] | None = None,
        source: Source | None = None,
        key: str | None = None,
        secrets: dict[str, str] | None = None,
        caller: Caller | None = None,
        project: str = "default",
    ) -> Reply:
        """`plan` and `accept` in one call (the shell splits them to plan in a thread)."""
        planned = self.plan(pipeline, env, source, secrets=secrets, project=project)
        return self.known_key(key, planned.request) or self.accept(
            planned, source, key, secrets, caller
        )

    def append_log(self, attempt_id: str, seq: int, data: bytes) -> None:
        """A chunk of a running attempt's log, stored as far as its run's budget allows."""
        kept = self.log_budget.admit(attempt_id, data)
        if kept:
            self.store.append_log(attempt_id, seq, kept)

    def _over_quota(self, project: str) -> OverQuota | None:
        config = self.settings.projects.get(project)
        limit = (
            config.max_queued_runs
            if config and config.max_queued_runs
            else self.settings.max_queued_runs
        )
        queued = sum(
            1
            for r in self.sched.runs.values()
            if r.project == project and r.state is RunState.QUEUED
        )
        if queued < limit:
            return None
        return OverQuota(
            detail=f"project {project} has {queued} queued runs, its quota "
            f"(max_queued_runs: {limit}); submit again once some have started"
        )

    def _audit(
        self, caller: Caller | None, action: str, run: RunRecord, step: str = "", detail: str = ""
    ) -> AuditRecord:
        caller = caller or Caller()
        return AuditRecord(
            at=self.clock(),
            action=action,
            run_id=run.id,
            run_project=run.project,
            token_id=caller.token_id,
            project=caller.project,
            step=step,
            detail=detail,
        )

    def rerun(
        self, run_id: str, only_failed: bool = False, caller: Caller | None = None
    ) -> Reply | None:
        """A new run of a finished run's pipeline, on the same commit (or snapshot) with the
        same inputs, linked to it; with `only_failed`, its successes are carried over and only
        the failed part runs (`failed_part`). None for an unknown run."""
        old = self.store.get_run(run_id)
        if old is None:
            return None
        if not old.state.terminal:
            return Rejected(
                problems=[
                    f"run {run_id} is still {old.state.value}: re-run it "
                    "once it has ended (or cancel it)"
                ]
            )
        if old.source_digest and self.store.get_source(old.source_digest) is None:
            return Rejected(
                problems=[
                    f"run {run_id}'s source snapshot is no longer stored "
                    "(retention): submit the pipeline again"
                ]
            )
        over = self._over_quota(old.project)
        if over is not None:
            return over
        steps = self.store.get_steps(run_id)
        again = failed_part(steps) if only_failed else {s.name for s in steps}
        carried = {s.name: s for s in steps if s.name not in again}
        now = self.clock()
        run = old.model_copy(
            update=dict(
                id=new_run_id(now),
                seq=self.store.next_run_seq(),
                state=RunState.QUEUED,
                created_at=now,
                started_at=None,
                finished_at=None,
                reason="",
                cancel_requested=False,
                admitted=False,
                rerun_of=old.id,
            )
        )
        self.sched.submit(run, [s.spec for s in steps], now, carried)
        detail = f"of {old.id}" + (", only its failed part" if only_failed else "")
        self.commit(Changes(audit=[self._audit(caller, "rerun", run, detail=detail)]))
        return Submitted(run_id=run.id)

    def cancel(self, run_id: str, caller: Caller | None = None) -> str | None:
        """Cancel a run; idempotent. The run's state, or None for an unknown run."""
        run = self.sched.cancel(run_id, self.clock())
        if run is None:
            stored = self.store.get_run(run_id)
            return stored.state.value if stored else None
        self.commit(Changes(audit=[self._audit(caller, "cancel", run)]))
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
        names = (
            self.sched.steps[run_id] if active else {s.name for s in self.store.get_steps(run_id)}
        )
        if step not in names:
            return Missing(detail=f"run {run_id} has no step {step!r}")
        if not active:
            return Rejected(
                problems=[
                    f"run {run_id} has ended ({run.state.value}): nothing of it waits for approval"
                ]
            )
        problem = self.sched.approve(run_id, step, approved, by, comment, self.clock())
        if problem:
            return Rejected(problems=[problem])
        self.commit(
            Changes(
                audit=[
                    self._audit(
                        caller, "approve" if approved else "reject", run, step, detail=f"by {by}"
                    )
                ]
            )
        )
        record = self.sched.book.step(run_id, step) or next(
            s for s in self.store.get_steps(run_id) if s.name == step
        )  # its run has ended
        return record.state.value

    # --- notifications -------------------------------------------------------------------------

    def due_deliveries(self) -> list[DeliveryRecord]:
        """Notifications to try now, marked `sending` in the store first."""
        return self.outbox.take_due(self.clock())

    def delivery_body(self, delivery: DeliveryRecord) -> bytes:
        return self.outbox.body(delivery)

    def delivery_headers(self, delivery: DeliveryRecord) -> dict[str, str]:
        return self.outbox.headers(delivery)

    def delivery_done(
        self, delivery_id: str, status: int | None, error: str = "", final: bool = False
    ) -> None:
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

    # --- committing ----------------------------------------------------------------------------

    def commit(self, extra: Changes | None = None) -> Effects:
        """Write the scheduler's decisions (with `extra`: records that are not the scheduler's,
        an Idempotency-Key, a run's own secrets), tell the observers, and return (and keep, for
        `take_effects`) what to carry out. StoreError: nothing was written nor is carried out."""
        decisions = self.sched.take()
        changes = decisions.changes
        if extra is not None:
            changes.idempotency.update(extra.idempotency)
            changes.run_secrets.update(extra.run_secrets)
            changes.audit += extra.audit
            changes.deliveries.update(extra.deliveries)
            changes.schedules.update(extra.schedules)
            changes.drop_schedules += extra.drop_schedules
        changes.logs = [
            (a, seq, kept)
            for a, seq, data in changes.logs
            if (kept := self.log_budget.admit(a, data))
        ]
        if decisions.ended_runs:  # their notifications are recorded with their end
            self.outbox.record_ends(decisions.ended_runs, changes, self.clock())
            for run in decisions.ended_runs:
                self.log_budget.forget(run.id)
            changes.drop_run_secrets += [r.id for r in decisions.ended_runs]
        changes.drop_run_secrets += self._secrets_no_longer_needed(
            changes.drop_run_secrets, {run_id for run_id, _ in changes.steps}
        )
        for run_id, values in extra.run_secrets.items() if extra is not None else ():
            self._own_secrets[run_id] = set(values.values)  # looked at from the next commit
        if changes:
            t0 = time.perf_counter()
            self.store.save(changes)
            took_s, now = time.perf_counter() - t0, self.clock()
            for observer in self.observers:
                observer.committed(changes, took_s, now)
        effects = decisions.effects()
        for _, task in effects.dispatch:  # the run's own secrets the step lists, as handed out
            if task.step.secrets:
                own = self.store.get_run_secrets(task.run_id)
                task.secret_values = {n: own[n] for n in task.step.secrets if n in own}
        self._effects.extend(effects)
        return effects

    def _secrets_no_longer_needed(self, dropped: list[str], touched: set[str]) -> list[str]:
        """Runs whose own secrets no step will be given any more: every step that lists one
        has ended (a retry would still need them; a run that ended drops them anyway). Only
        the runs whose steps this batch changed are looked at: a commit stays cheap."""
        out = []
        for run_id in touched.union(dropped) & self._own_secrets.keys():
            names, steps = self._own_secrets[run_id], self.sched.steps.get(run_id)
            if run_id in dropped or steps is None:
                del self._own_secrets[run_id]
            elif all(s.state.terminal for s in steps.values() if names & set(s.spec.secrets)):
                del self._own_secrets[run_id]
                out.append(run_id)
        return out

    def take_effects(self) -> Effects:
        """The effects committed since the last call, for the shell to carry out."""
        out, self._effects = self._effects, Effects()
        return out

    # --- reads ---------------------------------------------------------------------------------

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
        for run in runs:  # (a run's own secrets, as the store still holds them)
            own = self.store.get_run_secrets(run.id)
            if own:
                self._own_secrets[run.id] = set(own)
        self.outbox.recover(self.clock())
        self.commit(self.timetable.sync(self.clock()))
        return len(runs)
