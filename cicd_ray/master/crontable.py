"""The master's schedules: kept in memory from the store, the repositories file's written to
the store at start (their last slot kept across restarts), those made through the API added
and deleted, and which are due now (cicd_ray.triggers.cron decides; `MasterCore.fire` writes a
slot with the run it started).

Which are due comes from a heap of next slots, so a tick looks only at the schedules whose
slot has come, not at every one. A schedule whose slot cannot be computed (an expression that
never fires, stored before that was refused) is written with its `last_error` and left out:
one bad record never stops the master.
"""

from __future__ import annotations

import heapq

from cicd_ray.config import Settings
from cicd_ray.errors import SpecError
from cicd_ray.master.admission import git_source_problems
from cicd_ray.pipeline.load import parse_pipeline
from cicd_ray.pipeline.model import GitSource
from cicd_ray.records import Changes
from cicd_ray.store import Store
from cicd_ray.triggers.cron import ScheduleRecord, ScheduleSpec, due, fires_problem, next_slot


class Timetable:
    """The schedules the master keeps in memory, and a heap of their next slots, so a tick looks
    only at the schedules that are due; the repositories file's are written to the store."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.schedules: dict[str, ScheduleRecord] = {}
        self.firing: set[str] = set()  # ids whose slot is being started
        self._heap: list[tuple[float, str]] = []  # (next slot, id); stale entries skipped
        self._next: dict[str, float] = {}  # each schedule's next slot (the heap's truth)
        self.broken = Changes()  # records found unusable, for the caller to write

    def sync(self, now: float) -> Changes:
        """Take up the stored schedules with the repositories file's (new ones start from
        now; changed ones keep their last slot; those no longer in the file go)."""
        stored = {s.id: s for s in self.store.list_schedules()}
        changes = Changes()
        from_file: set[str] = set()
        for spec in self.settings.schedules:
            project = self.settings.repos[spec.repository].project
            old = stored.get(f"{project}/{spec.name}")
            kept = (
                {
                    "created_at": old.created_at,
                    "last_slot": old.last_slot,
                    "last_run": old.last_run,
                    "last_error": old.last_error,
                }
                if old
                else {"created_at": now, "last_slot": now}
            )
            record = ScheduleRecord(**spec.model_dump(), project=project, origin="file", **kept)
            from_file.add(record.id)
            if record != old:
                changes.schedules[record.id] = record
        changes.drop_schedules = [
            i for i, s in stored.items() if s.origin == "file" and i not in from_file
        ]
        self.schedules = {
            **{i: s for i, s in stored.items() if i not in changes.drop_schedules},
            **changes.schedules,
        }
        self._heap, self._next = [], {}
        for record in self.schedules.values():
            self._plan(record)
        changes.schedules.update(self.take_broken().schedules)
        return changes

    def _plan(self, record: ScheduleRecord) -> None:
        """Put the schedule's next slot on the heap; a schedule whose slot cannot be computed
        is marked with why (written by the caller) and left off it."""
        try:
            at = next_slot(record, record.last_slot)
        except Exception as e:  # one bad record never stops the master
            self._next.pop(record.id, None)
            error = f"its next slot cannot be computed: {type(e).__name__}: {e}"[:1000]
            if record.last_error != error:
                record.last_error = error
                self.broken.schedules[record.id] = record
            return
        self._next[record.id] = at
        heapq.heappush(self._heap, (at, record.id))

    def take_broken(self) -> Changes:
        broken, self.broken = self.broken, Changes()
        return broken

    def due(self, now: float) -> tuple[list[tuple[ScheduleRecord, float]], Changes]:
        """The schedules with a slot to start now (marked firing until `fired`), and the
        records to write: those whose missed slots were skipped, and those found broken."""
        out, written = [], Changes()
        while self._heap and self._heap[0][0] <= now:
            at, sid = heapq.heappop(self._heap)
            record = self.schedules.get(sid)
            if record is None or self._next.get(sid) != at or sid in self.firing:
                continue  # deleted, moved, or its slot is being started
            try:
                slot, last = due(record, now)
            except Exception as e:  # marked and skipped, never fatal
                record.last_error = f"{type(e).__name__}: {e}"[:1000]
                self._next.pop(sid, None)
                written.schedules[sid] = record
                continue
            if slot is not None:
                self.firing.add(sid)
                out.append((record.model_copy(), slot))
                continue
            if last != record.last_slot:
                record.last_slot = last
                written.schedules[sid] = record
            self._plan(record)
        written.schedules.update(self.take_broken().schedules)
        return out, written

    def fired(self, record: ScheduleRecord) -> None:
        self.firing.discard(record.id)
        if record.id in self.schedules:
            self.schedules[record.id] = record
            self._plan(record)

    def check(self, spec: ScheduleSpec, project: str, now: float) -> list[str]:
        """What is wrong with a schedule to be made through the API (pure work: parsing and
        cron arithmetic, done off the master's loop)."""
        problems = []
        if spec.repository:
            repo = self.settings.repos.get(spec.repository)
            if repo is None or repo.project != project:
                problems.append(
                    f"repository: {spec.repository!r} is not a repository of "
                    f"project {project} in CICD_RAY_REPOS"
                )
        elif not spec.pipeline:
            problems.append("a schedule runs a `pipeline` or a `repository`'s pipeline file")
        else:
            try:
                parsed = parse_pipeline(
                    spec.pipeline, max_bytes=self.settings.max_pipeline_bytes, measure_objects=True
                )
                if isinstance(parsed.source, GitSource):  # made through the API: checked now,
                    found = git_source_problems(
                        parsed.source.git,  # as its slots are not
                        self.settings.git_allow,
                    )
                    problems += [f"pipeline: {p}" for p in found]
            except SpecError as e:
                problems += [f"pipeline: {p}" for p in e.problems]
        problem = fires_problem(spec, now, self.settings.schedule_min_interval_s)
        return problems + ([problem] if problem else [])

    def add(
        self, spec: ScheduleSpec, project: str, now: float, problems: list[str] | None = None
    ) -> ScheduleRecord:
        """A schedule made through the API; SpecError when it cannot be one. `problems`:
        what `check` found already (None: checked here)."""
        problems = list(self.check(spec, project, now) if problems is None else problems)
        record = ScheduleRecord(**spec.model_dump(), project=project, created_at=now, last_slot=now)
        if record.id in self.schedules:
            problems.append(f"project {project} has a schedule {spec.name} already")
        cap = self.settings.max_schedules_per_project
        if sum(s.project == project for s in self.schedules.values()) >= cap:
            problems.append(
                f"project {project} has {cap} schedules, the most it may have "
                "(CICD_RAY_MAX_SCHEDULES): delete one first"
            )
        if problems:
            raise SpecError(problems)
        self.schedules[record.id] = record
        self._plan(record)
        return record

    def remove(self, sid: str) -> None:
        self.schedules.pop(sid, None)
        self._next.pop(sid, None)

    def view(self, project: str | None, now: float) -> list[dict]:
        """The schedules (of `project`; None: all) with their next slot (None: it has none),
        JSON-ready."""
        return [
            {
                **s.model_dump(mode="json"),
                "id": s.id,
                "next_at": _next_or_none(s, max(now, s.last_slot)),
            }
            for s in self.schedules.values()
            if project is None or s.project == project
        ]


def _next_or_none(record: ScheduleRecord, after: float) -> float | None:
    try:
        return next_slot(record, after)
    except Exception:  # shown as no next slot; its last_error says why
        return None
