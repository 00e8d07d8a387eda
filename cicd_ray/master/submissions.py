"""Runs accepted: a submission planned (pure, off the loop) and accepted (stored before its id is
answered), a re-run of a finished run, and the checks on the way: an Idempotency-Key already
used, the project's quota of queued runs. Every accepted run writes an audit record with it.
"""

from __future__ import annotations

from collections.abc import Callable

from cicd_ray.config import Settings
from cicd_ray.master.admission import Planned, new_run_id, plan_submission
from cicd_ray.master.commit import Committer
from cicd_ray.master.crontable import Timetable
from cicd_ray.master.outbox import Outbox
from cicd_ray.pipeline.model import GitSource
from cicd_ray.protocol import Conflict, OverQuota, Rejected, Reply, SourceRef, Submitted
from cicd_ray.records import AuditRecord, Caller, Changes, KeyRecord, RunRecord, RunSecrets
from cicd_ray.scheduler import Scheduler
from cicd_ray.scheduler.runbook import failed_part
from cicd_ray.states import RunState
from cicd_ray.store import Store
from cicd_ray.store.blobs import ArtifactStore
from cicd_ray.triggers.cron import ScheduleRecord


class Submissions:
    """Where runs come in: from people, from webhooks and slots (`Starts`), from re-runs."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        sched: Scheduler,
        clock: Callable[[], float],
        committer: Committer,
        outbox: Outbox,
        timetable: Timetable,
        blobs: ArtifactStore,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sched = sched
        self.clock = clock
        self.committer = committer
        self.outbox = outbox
        self.timetable = timetable
        self.blobs = blobs  # where the edges put source snapshots

    def plan(
        self,
        pipeline: dict | str,
        env: dict[str, str] | None = None,
        source: SourceRef | None = None,
        request: str | None = None,
        secrets: dict[str, str] | None = None,
        project: str = "default",
        from_api: bool = False,
    ) -> Planned:
        """Check and plan a submission; pure, so the shell runs it in a thread. `request`: its
        digest, when the caller has it already; `secrets`: the submission's own; `project`:
        whose run it is to be; `from_api`: sent through the HTTP API (its git source must name
        a public host, or one CICD_RAY_GIT_ALLOW lists)."""
        git_allow = self.settings.git_allow if from_api else None
        return plan_submission(
            pipeline,
            env or {},
            source,
            self.settings,
            request,
            secrets=secrets or {},
            project=project,
            git_allow=git_allow,
            source_stored=self.blobs.has,
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
        source: SourceRef | None = None,
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
        answer = self.known_key(key, planned.request) or self.over_quota(planned.project)
        if answer is not None:
            return answer
        now = self.clock()
        run = self._new_run(planned, source, now)
        self.sched.submit(run, planned.steps, now)
        extra = Changes(audit=[audit(caller, "submit", run, now)])
        if key:
            extra.idempotency[key] = KeyRecord(run_id=run.id, request=planned.request, at=now)
        if secrets:  # stored apart, with the run, before its id is returned
            extra.run_secrets[run.id] = RunSecrets(values=secrets)
        self.outbox.record_status(run, extra, now)  # pending, for a repository's webhook run
        if schedule is not None:
            schedule.last_run, schedule.last_error = run.id, ""
            extra.schedules[schedule.id] = schedule
            self.timetable.fired(schedule)
        self.committer.commit(extra)
        return Submitted(run_id=run.id)

    def _new_run(self, planned: Planned, source: SourceRef | None, now: float) -> RunRecord:
        spec = planned.spec
        git = spec.source if isinstance(spec.source, GitSource) else None
        return RunRecord(
            id=new_run_id(now),
            seq=self.store.next_run_seq(),
            pipeline=spec.name,
            created_at=now,
            source_digest=source.digest if source else None,
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
        """`plan` and `accept` in one call (the shell splits them to plan in a thread)."""
        planned = self.plan(pipeline, env, source, secrets=secrets, project=project)
        known = self.known_key(key, planned.request)
        return known or self.accept(planned, source, key, secrets, caller)

    def _source_kept(self, digest: str) -> bool:
        """Whether a run's snapshot is still there: in the artifact store (or, for a run
        submitted before snapshots went there, in the store)."""
        return self.blobs.has(digest) or self.store.get_source(digest) is not None

    def over_quota(self, project: str) -> OverQuota | None:
        """The refusal of a project's run past its quota of queued runs, if it is there."""
        config = self.settings.projects.get(project)
        limit = (config and config.max_queued_runs) or self.settings.max_queued_runs
        runs = self.sched.runs.values()
        queued = sum(1 for r in runs if r.project == project and r.state is RunState.QUEUED)
        if queued < limit:
            return None
        return OverQuota(
            detail=f"project {project} has {queued} queued runs, its quota "
            f"(max_queued_runs: {limit}); submit again once some have started"
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
            problem = (
                f"run {run_id} is still {old.state.value}: re-run it once it has ended "
                "(or cancel it)"
            )
            return Rejected(problems=[problem])
        if old.source_digest and not self._source_kept(old.source_digest):
            problem = (
                f"run {run_id}'s source snapshot is no longer stored (retention): submit the "
                "pipeline again"
            )
            return Rejected(problems=[problem])
        over = self.over_quota(old.project)
        if over is not None:
            return over
        steps = self.store.get_steps(run_id)
        again = failed_part(steps) if only_failed else {s.name for s in steps}
        carried = {s.name: s for s in steps if s.name not in again}
        now = self.clock()
        fresh = dict(state=RunState.QUEUED, created_at=now, started_at=None, finished_at=None)
        fresh.update(reason="", cancel_requested=False, admitted=False, rerun_of=old.id)
        fresh.update(id=new_run_id(now), seq=self.store.next_run_seq())
        run = old.model_copy(update=fresh)
        self.sched.submit(run, [s.spec for s in steps], now, carried)
        detail = f"of {old.id}" + (", only its failed part" if only_failed else "")
        self.committer.commit(Changes(audit=[audit(caller, "rerun", run, now, detail=detail)]))
        return Submitted(run_id=run.id)


def audit(
    caller: Caller | None, action: str, run: RunRecord, now: float, step: str = "", detail: str = ""
) -> AuditRecord:
    """The audit record of `caller`'s action on a run (a person's, a webhook's, a slot's)."""
    caller = caller or Caller()
    return AuditRecord(
        at=now,
        action=action,
        run_id=run.id,
        run_project=run.project,
        token_id=caller.token_id,
        project=caller.project,
        step=step,
        detail=detail,
    )
