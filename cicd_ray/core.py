"""The master's core, with no Ray in it: the store, an injected clock, the scheduler, and the
observers of what is committed (the event log, which wakes the long polls; the metrics).

Every change goes the same way: the scheduler decides, `commit()` writes the records to the
store in one batch, tells the observers, and returns the effects to carry out (dispatch, kill,
start and stop workers) — only after the write. If the write fails nothing is carried out and
the error is raised: memory is now ahead of the store, so the core must be dropped and rebuilt
from the store (the actor exits and Ray restarts it). The actor (cicd_ray.master) is a shell
that turns effects into Ray calls; cicd_ray.inline carries them out in-process for tests.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cicd_ray.config import Settings
from cicd_ray.errors import SourceError, SpecError
from cicd_ray.events import EventLog
from cicd_ray.hooks import Trigger
from cicd_ray.outbox import Outbox
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
from cicd_ray.repos import RepoConfig
from cicd_ray.scheduler import Effects, Scheduler, check_fits
from cicd_ray.scheduler.runbook import failed_part
from cicd_ray.scheduler.share import Share
from cicd_ray.schedules import ScheduleRecord, ScheduleSpec
from cicd_ray.secrets import missing, run_secret_problems
from cicd_ray.source import resolve_ref
from cicd_ray.spec import (
    ConcurrencySpec,
    GitSource,
    PipelineSpec,
    PlannedStep,
    check_env_overrides,
    expanded,
    load_yaml,
    parse_pipeline,
    plan,
)
from cicd_ray.states import RunState
from cicd_ray.store import Store
from cicd_ray.timetable import Timetable
from cicd_ray.webhooks import refused_targets

RECENT_S = 600.0  # stopped workers shown for this long
Clock = Callable[[], float]
Source = tuple[str, bytes]  # (sha256 digest, .tar.gz bytes)


class Observer(Protocol):
    def committed(self, changes: Changes, took_s: float, now: float) -> None:
        """Called after each batch is written, with what it changed."""


@dataclass
class Planned:
    """A submission checked and planned (pure work, done off the master's loop)."""

    spec: PipelineSpec | None
    steps: list[PlannedStep]
    problems: list[str]
    request: str  # digest of the request, compared when an Idempotency-Key is repeated
    commit: str | None = None  # the SHA a git source's ref named at submission
    branch: str = ""  # the branch that ref named, if it named one
    concurrency: ConcurrencySpec | None = None  # the run's group, expanded from its env
    project: str = "default"  # whose run it is
    event: str = "manual"  # what started it (a webhook: push, pull_request)
    pr: int | None = None
    repo: str = ""  # the repository whose webhook started it
    scheduled_for: float | None = None  # the slot of the schedule that started it


class MasterCore:
    def __init__(self, settings: Settings, store: Store, clock: Clock = time.time,
                 observers: list[Observer] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.started_at = clock()
        self.sched = Scheduler(settings.pools, heartbeat_timeout_s=settings.heartbeat_timeout_s,
                               lookahead=settings.lookahead,
                               artifact_run_max_bytes=settings.artifact_run_max_bytes,
                               results=store.get_result,
                               share=Share(settings.projects, settings.fair_share))
        self.outbox = Outbox(store, settings)
        self.timetable = Timetable(store, settings)
        self.events = EventLog(self.started_at)
        self.observers: list[Observer] = [self.events, *(observers or [])]
        self._effects = Effects()
        self.recovered = self._recover()

    # --- submissions ---------------------------------------------------------------------------

    def plan(self, pipeline: dict | str, env: dict[str, str] | None = None,
             source: Source | None = None, request: str | None = None,
             secrets: dict[str, str] | None = None, project: str = "default") -> Planned:
        """Check and plan a submission; pure, so the shell runs it in a thread. `request`: its
        digest, when the caller has it already; `secrets`: the submission's own; `project`:
        whose run it is to be."""
        return plan_submission(pipeline, env or {}, source, self.settings, request,
                               secrets=secrets or {}, project=project)

    def plan_trigger(self, repo: RepoConfig, trigger: Trigger, text: str,
                     request: str | None) -> Planned:
        """Plan the run a webhook asks for: the pipeline file's text, its source the
        repository at the commit (pinned as it is, not looked up again)."""
        planned = self._from_repository(repo, text, trigger.commit, trigger.branch, {},
                                        request, repo.project)
        planned.event, planned.pr = trigger.event, trigger.pr
        return planned

    def _from_repository(self, repo: RepoConfig, text: str, commit: str, branch: str,
                         env: dict[str, str], request: str | None, project: str) -> Planned:
        """Plan a repository's pipeline file (its text) to build `commit`; problems name the
        file."""
        try:
            doc = load_yaml(text, max_bytes=self.settings.max_pipeline_bytes)
        except SpecError as e:
            return Planned(None, [], [f"{repo.pipeline}: {p}" for p in e.problems],
                           request or "", project=project)
        if isinstance(doc, dict):
            doc = {**doc, "source": {"git": repo.url, "ref": commit}}
        planned = plan_submission(doc, env, None, self.settings, request,
                                  resolve=lambda url, ref: (commit, branch), project=project)
        planned.problems = [f"{repo.pipeline}: {p}" for p in planned.problems]
        planned.repo = repo.name
        return planned

    def known_key(self, key: str | None, request: str) -> Reply | None:
        """The answer to an Idempotency-Key already used: its run, or a conflict."""
        known = self.store.get_key(key) if key else None
        if known is None:
            return None
        if known.request and known.request != request:
            return Conflict(run_id=known.run_id)
        return Submitted(run_id=known.run_id, existing=True)

    def accept(self, planned: Planned, source: Source | None = None,
               key: str | None = None, secrets: dict[str, str] | None = None,
               caller: Caller | None = None, schedule: ScheduleRecord | None = None) -> Reply:
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
        run = RunRecord(id=new_run_id(now), seq=self.store.next_run_seq(), pipeline=spec.name,
                        created_at=now, source_digest=source[0] if source else None,
                        source_git=None if source else git,
                        commit=None if source else planned.commit,
                        branch="" if source else planned.branch,
                        concurrency=planned.concurrency, notify=spec.notify,
                        project=planned.project, event=planned.event, pr=planned.pr,
                        repo=planned.repo, scheduled_for=planned.scheduled_for)
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

    def submit(self, pipeline: dict | str, env: dict[str, str] | None = None,
               source: Source | None = None, key: str | None = None,
               secrets: dict[str, str] | None = None, caller: Caller | None = None,
               project: str = "default") -> Reply:
        """`plan` and `accept` in one call (the shell splits them to plan in a thread)."""
        planned = self.plan(pipeline, env, source, secrets=secrets, project=project)
        return self.known_key(key, planned.request) or self.accept(planned, source, key,
                                                                   secrets, caller)

    def _over_quota(self, project: str) -> OverQuota | None:
        config = self.settings.projects.get(project)
        limit = config.max_queued_runs if config else None
        if limit is None:
            return None
        queued = sum(1 for r in self.sched.runs.values()
                     if r.project == project and r.state is RunState.QUEUED)
        if queued < limit:
            return None
        return OverQuota(detail=f"project {project} has {queued} queued runs, its quota "
                         f"(max_queued_runs: {limit}); submit again once some have started")

    def _audit(self, caller: Caller | None, action: str, run: RunRecord, step: str = "",
               detail: str = "") -> AuditRecord:
        caller = caller or Caller()
        return AuditRecord(at=self.clock(), action=action, run_id=run.id,
                           run_project=run.project, token_id=caller.token_id,
                           project=caller.project, step=step, detail=detail)

    def rerun(self, run_id: str, only_failed: bool = False,
              caller: Caller | None = None) -> Reply | None:
        """A new run of a finished run's pipeline, on the same commit (or snapshot) with the
        same inputs, linked to it; with `only_failed`, its successes are carried over and only
        the failed part runs (`failed_part`). None for an unknown run."""
        old = self.store.get_run(run_id)
        if old is None:
            return None
        if not old.state.terminal:
            return Rejected(problems=[f"run {run_id} is still {old.state.value}: re-run it "
                                      "once it has ended (or cancel it)"])
        if old.source_digest and self.store.get_source(old.source_digest) is None:
            return Rejected(problems=[f"run {run_id}'s source snapshot is no longer stored "
                                      "(retention): submit the pipeline again"])
        over = self._over_quota(old.project)
        if over is not None:
            return over
        steps = self.store.get_steps(run_id)
        again = failed_part(steps) if only_failed else {s.name for s in steps}
        carried = {s.name: s for s in steps if s.name not in again}
        now = self.clock()
        run = old.model_copy(update=dict(
            id=new_run_id(now), seq=self.store.next_run_seq(), state=RunState.QUEUED,
            created_at=now, started_at=None, finished_at=None, reason="",
            cancel_requested=False, admitted=False, rerun_of=old.id))
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

    def approve(self, run_id: str, step: str, approved: bool, by: str,
                comment: str = "", caller: Caller | None = None) -> str | Rejected | Missing:
        """Answer a step waiting for approval: the step's new state, Rejected when it is not
        waiting, Missing for an unknown run or step."""
        run = self.sched.runs.get(run_id) or self.store.get_run(run_id)
        if run is None:
            return Missing(detail=f"run {run_id!r} not found")
        active = run_id in self.sched.steps
        names = self.sched.steps[run_id] if active else {
            s.name for s in self.store.get_steps(run_id)}
        if step not in names:
            return Missing(detail=f"run {run_id} has no step {step!r}")
        if not active:
            return Rejected(problems=[f"run {run_id} has ended ({run.state.value}): nothing "
                                      "of it waits for approval"])
        problem = self.sched.approve(run_id, step, approved, by, comment, self.clock())
        if problem:
            return Rejected(problems=[problem])
        self.commit(Changes(audit=[self._audit(caller, "approve" if approved else "reject", run,
                                               step, detail=f"by {by}")]))
        record = self.sched.book.step(run_id, step) or next(
            s for s in self.store.get_steps(run_id) if s.name == step)  # its run has ended
        return record.state.value

    # --- schedules -----------------------------------------------------------------------------

    def due_schedules(self) -> list[tuple[ScheduleRecord, float]]:
        """The schedules with a slot to start now (missed slots skipped are written here)."""
        due, skipped = self.timetable.due(self.clock())
        if skipped:
            self.commit(skipped)
        return due

    def plan_schedule(self, record: ScheduleRecord, slot: float, pipeline: str | dict,
                      commit: str | None = None, branch: str = "") -> Planned:
        """Plan a slot's run: a repository's pipeline file (its text, read at `commit`) or the
        schedule's own pipeline, with the schedule's env."""
        request = f"schedule:{record.id}:{slot}"
        if record.repository:
            planned = self._from_repository(self.settings.repos[record.repository], pipeline,
                                            commit or "", branch, record.env, request,
                                            record.project)
        else:
            planned = plan_submission(pipeline, record.env, None, self.settings, request,
                                      project=record.project)
        planned.event, planned.scheduled_for = "schedule", slot
        return planned

    def fire(self, record: ScheduleRecord, slot: float, planned: Planned) -> Reply:
        """Start a slot's run and write the slot with it; a slot whose run cannot start is
        written with why (it is not tried again)."""
        current = self.timetable.schedules.get(record.id)
        if current is None or current.last_slot >= slot:  # deleted, or fired meanwhile
            self.timetable.fired(record)
            return Rejected(problems=[f"schedule {record.id}: slot {slot} is not due"])
        updated = current.model_copy(update={"last_slot": slot})
        caller = Caller(token_id="schedule", project=record.project, admin=False)
        answer = self.accept(planned, caller=caller, schedule=updated)
        if not isinstance(answer, Submitted):
            updated.last_error = ("; ".join(answer.problems) if isinstance(answer, Rejected)
                                  else getattr(answer, "detail", str(answer)))[:1000]
            self.timetable.fired(updated)
            self.commit(Changes(schedules={updated.id: updated}))
        return answer

    def add_schedule(self, spec: ScheduleSpec, project: str) -> dict | Rejected:
        try:
            record = self.timetable.add(spec, project, self.clock())
        except SpecError as e:
            return Rejected(problems=e.problems)
        self.commit(Changes(schedules={record.id: record}))
        return next(v for v in self.timetable.view(project, self.clock())
                    if v["id"] == record.id)

    def delete_schedule(self, project: str, name: str) -> bool:
        """False when the project has no such schedule made through the API."""
        record = self.timetable.schedules.get(f"{project}/{name}")
        if record is None or record.origin != "api":
            return False
        del self.timetable.schedules[record.id]
        self.commit(Changes(drop_schedules=[record.id]))
        return True

    # --- notifications -------------------------------------------------------------------------

    def due_deliveries(self) -> list[DeliveryRecord]:
        """Notifications to try now, marked `sending` in the store first."""
        return self.outbox.take_due(self.clock())

    def delivery_body(self, delivery: DeliveryRecord) -> bytes:
        return self.outbox.body(delivery)

    def delivery_headers(self, delivery: DeliveryRecord) -> dict[str, str]:
        return self.outbox.headers(delivery)

    def delivery_done(self, delivery_id: str, status: int | None, error: str = "",
                      final: bool = False) -> None:
        self.outbox.settle(delivery_id, status, error, self.clock(), final)

    # --- workers -------------------------------------------------------------------------------

    def register(self, record: WorkerRecord, running: list[str] | None = None,
                 finished: list[StepOutcome] | None = None) -> float:
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
        if decisions.ended_runs:  # their notifications are recorded with their end
            self.outbox.record_ends(decisions.ended_runs, changes, self.clock())
            changes.drop_run_secrets += [r.id for r in decisions.ended_runs]
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
        self.outbox.recover(self.clock())
        self.commit(self.timetable.sync(self.clock()))
        return len(runs)


def plan_submission(pipeline: dict | str, env: dict[str, str], source: Source | None,
                    settings: Settings, request: str | None = None,
                    resolve: Callable[[str, str], tuple[str, str]] = resolve_ref,
                    secrets: dict[str, str] | None = None, project: str = "default") -> Planned:
    """(spec, planned steps, problems) of a submission, its request digest, and the commit its
    git source is pinned to, with the branch its ref named (`resolve` asks the repository: the
    one step that is not pure)."""
    secrets = secrets or {}
    request = request or request_digest(pipeline, env, source, list(secrets))
    try:
        spec = parse_pipeline(pipeline, max_bytes=settings.max_pipeline_bytes)
        problems = check_env_overrides(env)
        steps = plan(spec, env) if not problems else []
        group = expanded(spec.concurrency, {**spec.env, **env}, "concurrency.group")
    except SpecError as e:
        return Planned(None, [], e.problems, request, project=project)
    problems += check_fits(steps, settings.pools)
    problems += [f"notify[{i}].webhook: {why}" for i, why in
                 refused_targets([n.webhook for n in spec.notify], settings.webhook_allow)]
    problems += run_secret_problems(secrets)
    listed = {(s.base, name) for s in steps for name in s.secrets  # variants list the same
              if name not in secrets}  # the submission's own
    problems += [f"steps[{base}].secrets: {why}" for base, name in sorted(listed)
                 for why in missing(settings.secrets_dir, project, [name])]
    if source is not None and len(source[1]) > settings.source_limit_bytes:
        problems.append(f"source: {len(source[1])} bytes is more than the "
                        f"{settings.source_limit_bytes} byte limit")
    commit, branch = None, ""
    if not problems and source is None and isinstance(spec.source, GitSource):
        try:
            commit, branch = resolve(spec.source.git, spec.source.ref)
        except SourceError as e:
            problems.append(f"source.ref: {e}")
    return Planned(spec, steps, problems, request, commit, branch, group, project)


def request_digest(pipeline: dict | str, env: dict[str, str] | None,
                   source: Source | None, secret_names: list[str] | None = None) -> str:
    """What a repeated Idempotency-Key is compared by: the pipeline, env, source and the names
    of the submission's own secrets (never their values: a digest of a short value could be
    guessed back from the store)."""
    parts = [pipeline, env or {}, source[0] if source else None]
    if secret_names:  # (without any, the digest is what it was before secrets came)
        parts.append(sorted(secret_names))
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def hook_key(repo: RepoConfig, trigger: Trigger) -> str | None:
    """The key a webhook's delivery is remembered by (a redelivery carries the same id)."""
    if not trigger.delivery:
        return None
    text = f"hook:{repo.provider}:{repo.name}:{trigger.delivery}"
    return hashlib.sha256(text.encode()).hexdigest()


def new_run_id(now: float) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + uuid.uuid4().hex[:6]
