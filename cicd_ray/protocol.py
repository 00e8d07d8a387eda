"""The typed messages between the edges (API, Python client, CLI) and the master: every reply
that crosses a process boundary is one of these models, not a dict whose shape lives in a
docstring. They serialise to the JSON the HTTP API answers with.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cicd_ray import tokens
from cicd_ray.pipeline.model import GitSource
from cicd_ray.records import AttemptRecord, Caller, DeliveryRecord, RunRecord, StepRecord

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


class ArchiveSource(BaseModel):
    """A directory packed as a gzip'd tar, base64-encoded (what `cicd-ray submit` sends)."""

    model_config = ConfigDict(extra="forbid")
    archive: str = Field(description="base64 of a .tar.gz of the source directory")


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pipeline: str | dict[str, Any] = Field(description="the pipeline: YAML text or an object")
    env: dict[str, str] = Field(default_factory=dict, description="env overrides for every step")
    secrets: dict[str, str] = Field(
        default_factory=dict,
        description="the run's own secrets, given to the steps that list "
        "them (`secrets:`), masked in logs, never stored with the run, deleted when it ends",
    )
    source: ArchiveSource | GitSource | None = Field(
        None,
        description="an uploaded archive, or a repository the workers clone (this "
        "replaces the pipeline's own `source`)",
    )
    project: str | None = Field(
        None,
        pattern=tokens.PROJECT_NAME.pattern,
        description="whose run it is: the token's project (an admin's token may name any)",
    )


class RunCreated(BaseModel):
    run_id: str
    url: str


class SourceRef(BaseModel):
    """A source snapshot (a gzip'd tar) in the artifact store, by its SHA-256: the edge that
    took it in stored it there, the workers fetch it from there; the master holds only this."""

    model_config = ConfigDict(extra="forbid")
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class SubmitCommand(BaseModel):
    """A submission as the master takes it, from the HTTP API, the CLI or a Ray job: the
    pipeline (YAML text or an object), env overrides, the source snapshot (stored already, by
    its digest), an Idempotency-Key (already the caller's own), the run's own secrets (never
    printed: not in the repr), who submits and whose run it is."""

    model_config = ConfigDict(extra="forbid")

    pipeline: str | dict[str, Any]
    env: dict[str, str] = Field(default_factory=dict)
    source: SourceRef | None = None
    idempotency_key: str | None = None
    secrets: dict[str, str] = Field(default_factory=dict, repr=False)
    caller: Caller = Field(default_factory=Caller)
    project: str = "default"
