"""The master's schedules: kept in memory from the store, the repositories file's written to
the store at start (their last slot kept across restarts), those made through the API added
and deleted, and which are due now (cicd_ray.schedules decides; `MasterCore.fire` writes a
slot with the run it started)."""

from __future__ import annotations

from cicd_ray.config import Settings
from cicd_ray.errors import SpecError
from cicd_ray.records import Changes
from cicd_ray.schedules import ScheduleRecord, ScheduleSpec, due, next_slot
from cicd_ray.spec import parse_pipeline
from cicd_ray.store import Store


class Timetable:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.schedules: dict[str, ScheduleRecord] = {}
        self.firing: set[str] = set()  # ids whose slot is being started

    def sync(self, now: float) -> Changes:
        """Take up the stored schedules with the repositories file's (new ones start from
        now; changed ones keep their last slot; those no longer in the file go)."""
        stored = {s.id: s for s in self.store.list_schedules()}
        changes = Changes()
        from_file: set[str] = set()
        for spec in self.settings.schedules:
            project = self.settings.repos[spec.repository].project
            old = stored.get(f"{project}/{spec.name}")
            kept = {"created_at": old.created_at, "last_slot": old.last_slot,
                    "last_run": old.last_run, "last_error": old.last_error} if old else {
                "created_at": now, "last_slot": now}
            record = ScheduleRecord(**spec.model_dump(), project=project, origin="file", **kept)
            from_file.add(record.id)
            if record != old:
                changes.schedules[record.id] = record
        changes.drop_schedules = [i for i, s in stored.items()
                                  if s.origin == "file" and i not in from_file]
        self.schedules = {**{i: s for i, s in stored.items()
                             if i not in changes.drop_schedules}, **changes.schedules}
        return changes

    def due(self, now: float) -> tuple[list[tuple[ScheduleRecord, float]], Changes]:
        """The schedules with a slot to start now (marked firing until `done`), and the
        records of those whose missed slots were skipped."""
        out, skipped = [], Changes()
        for record in self.schedules.values():
            if record.id in self.firing:
                continue
            slot, last = due(record, now)
            if slot is not None:
                self.firing.add(record.id)
                out.append((record.model_copy(), slot))
            elif last != record.last_slot:
                record.last_slot = last
                skipped.schedules[record.id] = record
        return out, skipped

    def fired(self, record: ScheduleRecord) -> None:
        self.firing.discard(record.id)
        if record.id in self.schedules:
            self.schedules[record.id] = record

    def add(self, spec: ScheduleSpec, project: str, now: float) -> ScheduleRecord:
        """A schedule made through the API; SpecError when it cannot be one."""
        problems = []
        if spec.repository:
            repo = self.settings.repos.get(spec.repository)
            if repo is None or repo.project != project:
                problems.append(f"repository: {spec.repository!r} is not a repository of "
                                f"project {project} in CICD_RAY_REPOS")
        elif not spec.pipeline:
            problems.append("a schedule runs a `pipeline` or a `repository`'s pipeline file")
        else:
            try:
                parse_pipeline(spec.pipeline, max_bytes=self.settings.max_pipeline_bytes)
            except SpecError as e:
                problems += [f"pipeline: {p}" for p in e.problems]
        record = ScheduleRecord(**spec.model_dump(), project=project, created_at=now,
                                last_slot=now)
        if record.id in self.schedules:
            problems.append(f"project {project} has a schedule {spec.name} already")
        if problems:
            raise SpecError(problems)
        self.schedules[record.id] = record
        return record

    def view(self, project: str | None, now: float) -> list[dict]:
        """The schedules (of `project`; None: all) with their next slot, JSON-ready."""
        return [{**s.model_dump(mode="json"), "id": s.id,
                 "next_at": next_slot(s, max(now, s.last_slot))}
                for s in self.schedules.values() if project is None or s.project == project]
