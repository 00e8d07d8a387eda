"""The typed messages between the edges (API, Python client, CLI) and the master: every reply
that crosses a process boundary is one of these models, not a dict whose shape lives in a
docstring. They serialise to the JSON the HTTP API answers with.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from cicd_ray import tokens
from cicd_ray.pipeline.model import GitSource, PlannedStep
from cicd_ray.records import (
    ArtifactFile,
    ArtifactInput,
    AttemptRecord,
    CacheUse,
    Caller,
    DeliveryRecord,
    RunRecord,
    StepRecord,
)
from cicd_ray.states import StepState
from cicd_ray.triggers.cron import ScheduleSpec

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


# --- between the master and its workers ----------------------------------------------------


class StepTask(BaseModel):
    """What a worker is given to run one attempt of a step."""

    run_id: str
    attempt_id: str
    attempt: int
    step: PlannedStep
    source_digest: str | None = None
    source_git: GitSource | None = None
    commit: str | None = None  # the run's pinned commit, checked out instead of the ref
    pipeline: str = ""  # caches are kept per pipeline
    project: str = "default"  # the secrets its step lists are this project's
    branch: str = ""  # the run's, for the step's environment (CICD_BRANCH, CICD_EVENT, CICD_PR)
    event: str = "manual"
    pr: int | None = None
    fork: bool = False  # a pull request from another repository: no secrets, no cache saves
    inputs: list[ArtifactInput] = Field(default_factory=list)  # the needs' artifacts
    artifact_room_bytes: int = 0  # what the run may still keep (CICD_RAY_ARTIFACT_RUN_MAX_BYTES)
    # The values of the run's own secrets this step lists (added by the core as it hands the
    # task out; never stored with the task, which is not stored).
    secret_values: dict[str, str] = Field(default_factory=dict, repr=False)
    # Which master dispatched it: a worker whose master has changed since reports the outcome
    # itself, as the call that would have carried it back has no one waiting on it.
    master_epoch: float = 0.0


class StepOutcome(BaseModel):
    """What a worker reports back: a failing step is data, not an exception."""

    attempt_id: str
    run_id: str
    step: str
    state: StepState
    exit_code: int | None = None
    duration_s: float = 0.0
    peak_memory_mb: float | None = None
    cpu_time_s: float | None = None
    reason: str = ""
    runs_as: str = ""
    artifacts: list[ArtifactFile] = Field(default_factory=list)
    caches: list[CacheUse] = Field(default_factory=list)
    # The end of the log not yet streamed, stored with the outcome in the same transaction.
    log_seq: int = 0
    log_tail: bytes = b""


# --- the HTTP API's requests (those of runs are above) ---------------------------------------


class RerunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    only_failed: bool = False


Who = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,100}$")]


class ApproveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reject: bool = False
    comment: Annotated[str, StringConstraints(max_length=1000)] = ""
    by: Who | None = None  # a name the caller gives: kept with the comment, not as who answered


class NewSchedule(ScheduleSpec):
    project: str | None = None  # an admin's token may name one (else the token's)
