"""How runs start without a person: a git host's webhook and a cron schedule's slot. Two
parts, one per side: `Starts` here for `MasterCore` (pure: plans the run a webhook or a slot
asks for, and writes a slot with the run it started, so each slot starts exactly one run), and
`ShellStarts` for the master actor (cicd_ray.master.actor.starts: reads the pipeline file from
the repository in a thread, fires due slots, answers the API's schedule calls).
"""

from __future__ import annotations

from collections.abc import Callable

from cicd_ray.config import Settings
from cicd_ray.errors import SpecError
from cicd_ray.master.admission import Planned, plan_submission
from cicd_ray.master.commit import Committer
from cicd_ray.master.crontable import Timetable
from cicd_ray.master.submissions import Submissions
from cicd_ray.pipeline.load import load_yaml
from cicd_ray.protocol import Rejected, Reply, Submitted
from cicd_ray.records import Caller, Changes
from cicd_ray.source import file_at, resolve_ref
from cicd_ray.triggers.cron import ScheduleRecord, ScheduleSpec
from cicd_ray.triggers.githosts import Trigger
from cicd_ray.triggers.repositories import RepoConfig


def pipeline_file(repo: RepoConfig, trigger: Trigger, max_bytes: int) -> str:
    """The pipeline file a webhook's run follows: the one at its commit; for a fork's pull
    request, the base branch's (the fork's own file is the fork author's to write: it could
    list the project's secrets or caches)."""
    commit = trigger.commit
    if trigger.fork:
        commit = trigger.base_commit or resolve_ref(repo.url, trigger.base_branch)[0]
    return file_at(repo.url, commit, repo.pipeline, max_bytes)


class Starts:
    """The runs webhooks and cron slots start, planned and accepted through `Submissions`."""

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float],
        timetable: Timetable,
        submissions: Submissions,
        committer: Committer,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.timetable = timetable
        self.submissions = submissions
        self.commit = committer.commit

    def plan_trigger(
        self, repo: RepoConfig, trigger: Trigger, text: str, request: str | None
    ) -> Planned:
        """Plan the run a webhook asks for: the pipeline file's text, its source the
        repository at the commit (pinned as it is, not looked up again)."""
        planned = self._from_repository(
            repo, text, trigger.commit, trigger.branch, {}, request, repo.project
        )
        planned.event, planned.pr, planned.fork = trigger.event, trigger.pr, trigger.fork
        return planned

    def _from_repository(
        self,
        repo: RepoConfig,
        text: str,
        commit: str,
        branch: str,
        env: dict[str, str],
        request: str | None,
        project: str,
    ) -> Planned:
        """Plan a repository's pipeline file (its text) to build `commit`; problems name the
        file."""
        try:
            doc = load_yaml(text, max_bytes=self.settings.max_pipeline_bytes)
        except SpecError as e:
            return Planned(
                None,
                [],
                [f"{repo.pipeline}: {p}" for p in e.problems],
                request or "",
                project=project,
            )
        if isinstance(doc, dict):
            doc = {**doc, "source": {"git": repo.url, "ref": commit}}
        planned = plan_submission(
            doc,
            env,
            None,
            self.settings,
            request,
            resolve=lambda url, ref: (commit, branch),
            project=project,
        )
        planned.problems = [f"{repo.pipeline}: {p}" for p in planned.problems]
        planned.repo = repo.name
        return planned

    def due_schedules(self) -> list[tuple[ScheduleRecord, float]]:
        """The schedules with a slot to start now (missed slots skipped are written here)."""
        due, skipped = self.timetable.due(self.clock())
        if skipped:
            self.commit(skipped)
        return due

    def plan_schedule(
        self,
        record: ScheduleRecord,
        slot: float,
        pipeline: str | dict,
        commit: str | None = None,
        branch: str = "",
    ) -> Planned:
        """Plan a slot's run: a repository's pipeline file (its text, read at `commit`) or the
        schedule's own pipeline, with the schedule's env."""
        request = f"schedule:{record.id}:{slot}"
        if record.repository:
            planned = self._from_repository(
                self.settings.repos[record.repository],
                pipeline,
                commit or "",
                branch,
                record.env,
                request,
                record.project,
            )
        else:
            planned = plan_submission(
                pipeline, record.env, None, self.settings, request, project=record.project
            )
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
        answer = self.submissions.accept(planned, caller=caller, schedule=updated)
        if not isinstance(answer, Submitted):
            updated.last_error = (
                "; ".join(answer.problems)
                if isinstance(answer, Rejected)
                else getattr(answer, "detail", str(answer))
            )[:1000]
            self.timetable.fired(updated)
            self.commit(Changes(schedules={updated.id: updated}))
        return answer

    def add_schedule(
        self, spec: ScheduleSpec, project: str, problems: list[str] | None = None
    ) -> dict | Rejected:
        """Make a schedule; `problems`: what `Timetable.check` found (None: checked here)."""
        try:
            record = self.timetable.add(spec, project, self.clock(), problems)
        except SpecError as e:
            return Rejected(problems=e.problems)
        self.commit(Changes(schedules={record.id: record}))
        return next(v for v in self.timetable.view(project, self.clock()) if v["id"] == record.id)

    def delete_schedule(self, project: str, name: str) -> bool:
        """False when the project has no such schedule made through the API."""
        record = self.timetable.schedules.get(f"{project}/{name}")
        if record is None or record.origin != "api":
            return False
        self.timetable.remove(record.id)
        self.commit(Changes(drop_schedules=[record.id]))
        return True
