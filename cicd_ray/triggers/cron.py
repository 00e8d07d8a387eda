"""Cron schedules, pure: what a schedule is (from the repositories file's `schedules:` or
`POST /api/v1/schedules`), and which slot of its expression is due at a time, with the
policy for slots missed while the service was down. The time is passed in.

A schedule's `last_slot` is stored with the run its slot started, in one write, so each slot
starts exactly one run however often the master restarts. Missed slots (the service was
down through them): `missed: latest` runs the latest of them once; `missed: skip` runs none
(a slot is on time within ON_TIME_S of it).
"""

from __future__ import annotations

import itertools
from datetime import datetime, timezone
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from cicd_ray.pipeline.model import ENV_NAME, GIT_REF
from cicd_ray.tokens import PROJECT_NAME

ON_TIME_S = 60.0  # a slot run this late is still on time (`missed: skip` runs it)
SCHEDULE_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class ScheduleSpec(BaseModel):
    """A schedule as written: a repository's pipeline file at a ref, or (through the API) a
    pipeline of its own; when (a cron expression, with an optional sixth field of seconds,
    in a time zone); the env its runs get; what to do with missed slots."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, StringConstraints(pattern=SCHEDULE_NAME)]
    cron: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    timezone: Annotated[str, StringConstraints(max_length=64)] = "UTC"
    missed: Literal["latest", "skip"] = "latest"
    env: dict[
        Annotated[str, StringConstraints(pattern=ENV_NAME, max_length=128)],
        Annotated[str, StringConstraints(max_length=4096)],
    ] = Field(default_factory=dict)
    repository: str = ""  # a name in the repositories file: its project, URL, pipeline file
    ref: Annotated[str, StringConstraints(pattern=GIT_REF)] = "HEAD"
    pipeline: str | dict[str, Any] = ""  # a pipeline of its own (API), YAML text or object

    @field_validator("cron")
    @classmethod
    def _cron(cls, text: str) -> str:
        fields = text.split()
        if len(fields) not in (5, 6) or not croniter.is_valid(text):
            raise ValueError(
                f"{text!r} is not a cron expression (minute hour day month "
                "weekday, and optionally seconds as a sixth field)"
            )
        return text

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{name!r} is not a time zone (e.g. UTC, Europe/Berlin)") from None
        return name


class ScheduleRecord(ScheduleSpec):
    """A schedule as stored: whose, where it came from, and the last slot it fired."""

    project: Annotated[str, StringConstraints(pattern=PROJECT_NAME.pattern)] = "default"
    origin: Literal["file", "api"] = "api"
    created_at: float
    last_slot: float  # the last slot fired (a new schedule: when it was made)
    last_run: str | None = None
    last_error: str = ""

    @property
    def id(self) -> str:
        return f"{self.project}/{self.name}"


def _at(t: float, zone: str) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc).astimezone(ZoneInfo(zone))


def next_slot(spec: ScheduleSpec, after: float) -> float:
    """The first slot strictly after `after`."""
    return croniter(spec.cron, _at(after, spec.timezone)).get_next(float)


def latest_slot(spec: ScheduleSpec, now: float) -> float:
    """The last slot at or before `now`."""
    return croniter(spec.cron, _at(now + 0.001, spec.timezone)).get_prev(float)


SAMPLE_SLOTS = 16  # slots looked at for a schedule's shortest interval


def fires_problem(spec: ScheduleSpec, now: float, min_interval_s: float) -> str:
    """Why a schedule cannot be made, or "": its expression must name a slot that comes
    (`0 0 30 2 *` is valid to croniter and never fires) and its slots must be at least
    `min_interval_s` apart."""
    try:
        it = croniter(spec.cron, _at(now, spec.timezone))
        slots = [it.get_next(float) for _ in range(SAMPLE_SLOTS)]
    except (CroniterError, ValueError, OverflowError) as e:
        return f"cron: {spec.cron!r} never fires ({e})"
    gap = min(b - a for a, b in itertools.pairwise(slots))
    if gap < min_interval_s:
        return (
            f"cron: {spec.cron!r} fires every {gap:g} s; schedules may fire at most every "
            f"{min_interval_s:g} s (CICD_RAY_SCHEDULE_MIN_INTERVAL_S)"
        )
    return ""


def due(record: ScheduleRecord, now: float) -> tuple[float | None, float]:
    """(the slot to run now, or None; what `last_slot` becomes). Nothing is due until a slot
    after `last_slot` has come."""
    if next_slot(record, record.last_slot) > now:
        return None, record.last_slot
    latest = latest_slot(record, now)
    if record.missed == "skip" and now - latest > ON_TIME_S:
        return None, latest  # missed while down: skipped
    return latest, latest
