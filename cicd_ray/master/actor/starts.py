"""The master actor's side of runs started without a person: a webhook's run (the pipeline file
read from the repository in a thread) and a cron slot's (fired from the loop), and the API's
schedule calls. The pure side is cicd_ray.master.starts.
"""

from __future__ import annotations

import asyncio

from cicd_ray.config import Settings
from cicd_ray.errors import CicdError, SourceError
from cicd_ray.master.admission import Planned, hook_key
from cicd_ray.master.core import MasterCore
from cicd_ray.master.starts import pipeline_file
from cicd_ray.protocol import Rejected, Reply
from cicd_ray.records import Caller
from cicd_ray.source import file_at, resolve_ref
from cicd_ray.triggers.cron import ScheduleRecord, ScheduleSpec
from cicd_ray.triggers.githosts import Trigger


class ShellStarts:
    """The master actor's side of webhook and cron starts; `guarded` runs a call into the core
    and carries out what it commits, `wake` makes the loop dispatch at once."""

    def __init__(self, settings: Settings, core: MasterCore, guarded, wake: asyncio.Event) -> None:
        self.settings = settings
        self.core = core
        self._guarded = guarded
        self._wake = wake

    async def trigger(self, repo_name: str, trigger: Trigger) -> Reply:
        """Start the run a git host's webhook asks for (see cicd_ray.api.hooks): the pipeline
        file read from the repository at the commit, the run pinned to it, of the
        repository's project. A redelivery (the same delivery id) answers with the first
        run."""
        repo = self.settings.repos.get(repo_name)
        if repo is None:
            return Rejected(
                problems=[f"repository {repo_name} is not in the master's CICD_RAY_REPOS"]
            )
        key = hook_key(repo, trigger)
        known = self.core.submissions.known_key(key, key)
        if known is not None:
            return known
        try:
            text = await asyncio.to_thread(
                pipeline_file, repo, trigger, self.settings.max_pipeline_bytes
            )
        except SourceError as e:
            return Rejected(problems=[f"{repo.pipeline}: {e}"])
        planned = await asyncio.to_thread(self.core.starts.plan_trigger, repo, trigger, text, key)
        caller = Caller(token_id=f"{repo.provider}-webhook", project=repo.project, admin=False)
        answer = self._guarded(self.core.submissions.accept, planned, None, key, None, caller)
        self._wake.set()
        return answer

    async def schedules(self, project: str | None = None) -> list[dict]:
        """The schedules (of `project`; None: all) with their next and last slots."""
        return self.core.timetable.view(project, self.core.clock())

    async def add_schedule(self, spec: ScheduleSpec, project: str) -> dict | Rejected:
        # Parsing its pipeline and the cron arithmetic happen in a thread: the loop goes on.
        problems = await asyncio.to_thread(
            self.core.timetable.check, spec, project, self.core.clock()
        )
        return self._guarded(self.core.starts.add_schedule, spec, project, problems)

    async def delete_schedule(self, project: str, name: str) -> bool:
        return self._guarded(self.core.starts.delete_schedule, project, name)

    async def fire(self, record: ScheduleRecord, slot: float) -> None:
        """Start a schedule's slot: its pipeline read (a repository's file at its ref's
        commit now) and planned in threads, then the run and the slot written together."""
        try:
            planned = await asyncio.to_thread(self._plan_slot, record, slot)
        except Exception as e:  # a git host down, a file gone: written as the slot's error
            why = str(e) if isinstance(e, CicdError) else f"{type(e).__name__}: {e}"
            planned = Planned(None, [], [why], "", project=record.project)
        self._guarded(self.core.starts.fire, record, slot, planned)
        self._wake.set()

    def _plan_slot(self, record: ScheduleRecord, slot: float) -> Planned:
        if not record.repository:
            return self.core.starts.plan_schedule(record, slot, record.pipeline)
        repo = self.settings.repos[record.repository]
        commit, branch = resolve_ref(repo.url, record.ref)
        text = file_at(repo.url, commit, repo.pipeline, self.settings.max_pipeline_bytes)
        return self.core.starts.plan_schedule(record, slot, text, commit, branch)
