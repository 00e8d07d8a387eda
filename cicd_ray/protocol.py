"""The typed messages between the edges (API, Python client, CLI) and the master: every reply
that crosses a process boundary is one of these models, not a dict whose shape lives in a
docstring. They serialise to the JSON the HTTP API answers with.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from cicd_ray.records import AttemptRecord, DeliveryRecord, RunRecord, StepRecord

# How often a follower of a step's log asks for more (logs have no long poll).
LOG_POLL_S = 0.25
# The longest one long poll for a run's next change waits (then the follower asks again).
RUN_WAIT_S = 30.0


class Submitted(BaseModel):
    """The run is stored; `existing` when an Idempotency-Key named an earlier one."""

    kind: Literal["submitted"] = "submitted"
    run_id: str
    existing: bool = False


class Rejected(BaseModel):
    """The submission is invalid; nothing was stored."""

    kind: Literal["rejected"] = "rejected"
    problems: list[str]


class Conflict(BaseModel):
    """The Idempotency-Key was used for another request (that made `run_id`)."""

    kind: Literal["conflict"] = "conflict"
    run_id: str


class OverQuota(BaseModel):
    """The project is at its quota of queued runs; nothing was stored (HTTP 429)."""

    kind: Literal["over_quota"] = "over_quota"
    detail: str


Reply = Submitted | Rejected | Conflict | OverQuota


class Missing(BaseModel):
    """What was asked for does not exist; `detail` names what."""

    detail: str


class LogSlice(BaseModel):
    """A step's log from an offset: which attempt (None: not started yet), its state, the bytes,
    and whether the log can still grow."""

    attempt: int | None
    state: str
    data: bytes
    more: bool


class RunView(BaseModel):
    """A run with all its steps (in pipeline order) and attempts: what `status`, the API and
    the page show."""

    run: RunRecord
    steps: list[StepRecord]
    attempts: list[AttemptRecord]
    deliveries: list[DeliveryRecord] = Field(default_factory=list)  # its notifications

    def attempts_of(self, step: str) -> list[AttemptRecord]:
        return [a for a in self.attempts if a.step == step]


class RunChange(BaseModel):
    """The answer to a long poll for a run's next change: its state, and where to wait from
    next (`EPOCH:SEQ` of the master's events)."""

    run_id: str
    state: str
    position: str
