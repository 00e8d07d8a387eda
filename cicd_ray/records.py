"""What happened: the records the store keeps and the scheduler works on.

A Spec is what the user asked for; a Record is what happened. Records are pydantic models so the
store writes them as JSON and reads them back without hand-written mapping.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field

from cicd_ray.pipeline.model import ConcurrencySpec, GitSource, NotifySpec, PlannedStep
from cicd_ray.states import Kind, RunState, StepState, WorkerState
from cicd_ray.triggers.cron import ScheduleRecord


class ArtifactFile(BaseModel):
    """A file a step kept: its path in the workspace, size and SHA-256 (its name in the store)."""

    path: str
    size: int
    digest: str


class ArtifactInput(BaseModel):
    """The artifacts of one need, handed to a step at their paths."""

    step: str
    files: list[ArtifactFile]


class CacheUse(BaseModel):
    """What one `cache:` entry of a step did: restored (hit: its own key; partial: a restore
    key's newest entry; miss: nothing), and saved after the step when it was no hit."""

    key: str
    result: Literal["hit", "partial", "miss"] = "miss"
    restored_from: str = ""  # the key of the entry restored
    bytes_restored: int = 0
    from_node: bool = False  # restored from the node's own copy, without a download
    bytes_saved: int = 0
    note: str = ""  # why it was not restored or saved, when something went wrong


class Origin(BaseModel):
    """Where a reused or carried-over step's result came from."""

    run_id: str
    step: str
    attempt: int


class Approval(BaseModel):
    """Who released or rejected a step waiting for approval, when and why."""

    decision: Literal["approved", "rejected"]
    by: str
    at: float
    comment: str = ""


class RunRecord(BaseModel):
    kind: ClassVar[Kind] = "run"

    id: str
    seq: int = 0
    pipeline: str
    state: RunState = RunState.QUEUED
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    reason: str = ""
    source_digest: str | None = None
    source_git: GitSource | None = None
    commit: str | None = None  # the SHA source_git's ref named at submission, built by all steps
    cancel_requested: bool = False
    rerun_of: str | None = None  # the run this one re-runs (same pipeline, commit and inputs)
    branch: str = ""  # the branch its git source named ("" for a snapshot or a commit)
    event: str = "manual"  # what started it: manual (API, CLI, client), push, pull_request,
    # schedule
    scheduled_for: float | None = None  # the slot of the schedule that started it
    pr: int | None = None  # the pull (merge) request that started it
    fork: bool = False  # that request came from another repository: no secrets, no cache saves
    repo: str = ""  # the repository (CICD_RAY_REPOS) whose webhook started it: told its status
    concurrency: ConcurrencySpec | None = None  # its group expanded from the run's env
    admitted: bool = False  # its concurrency group let it in (kept: the order survives restarts)
    notify: list[NotifySpec] = Field(default_factory=list)
    project: str = "default"  # whose it is: who may see it, whose secrets its steps get

    @property
    def variables(self) -> dict[str, str]:
        """What `if:` conditions read as run.NAME."""
        return {"branch": self.branch, "event": self.event, "pipeline": self.pipeline}


class StepRecord(BaseModel):
    kind: ClassVar[Kind] = "step"

    run_id: str
    spec: PlannedStep
    project: str = "default"  # its run's (told with its events)
    state: StepState = StepState.QUEUED
    attempts: int = 0
    current_attempt: str | None = None
    worker_id: str | None = None
    queued_at: float
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    reason: str = ""
    spot_evicted: bool = False  # an attempt on a spot pool was lost: no more spot for it
    infra_retries: int = 0  # attempts lost with their worker and retried automatically
    artifacts: list[ArtifactFile] = Field(default_factory=list)  # of the attempt that succeeded
    # What determines its result (cicd_ray.scheduler.reuse): the key, and a digest per part
    # for `explain`.
    key: str = ""
    key_parts: dict[str, str] = Field(default_factory=dict)
    reused_from: Origin | None = None  # not run: a success with the same key was reused
    carried_from: Origin | None = None  # not run: carried over from the run re-run
    skipped_by_condition: bool = False  # its `if:` was false (not a need that failed)
    admitted: bool = False  # its concurrency group let it in
    waiting_since: float | None = None  # when it began waiting for approval
    approval: Approval | None = None

    @property
    def name(self) -> str:
        return self.spec.name


class AttemptRecord(BaseModel):
    kind: ClassVar[Kind] = "attempt"

    id: str
    run_id: str
    step: str
    number: int
    worker_id: str
    state: StepState = StepState.RUNNING
    queued_at: float
    started_at: float
    finished_at: float | None = None
    exit_code: int | None = None
    duration_s: float | None = None
    peak_memory_mb: float | None = None
    cpu_time_s: float | None = None
    reason: str = ""
    # Where the time before it started went: waiting for a worker or node to come up (the one
    # that ran it was not ready yet when it was queued), and waiting for a free slot (the rest).
    wait_capacity_s: float = 0.0
    wait_slot_s: float = 0.0
    pool: str = ""  # the pool of the worker that ran it (a spot pool for interruptible steps)
    runs_as: str = ""  # the user its process ran as: "uid N" (its own) or the worker's
    artifacts: list[ArtifactFile] = Field(default_factory=list)
    caches: list[CacheUse] = Field(default_factory=list)
    reused_from: Origin | None = None


class WorkerRecord(BaseModel):
    kind: ClassVar[Kind] = "worker"

    id: str
    pool: str
    node: str = ""
    cpus: float
    memory_mb: int
    state: WorkerState = WorkerState.STARTING
    started_at: float
    ready_at: float | None = None
    stopped_at: float | None = None
    reason: str = ""  # why it was started, retired or lost
    last_heartbeat: float | None = None
    cpu_percent: float | None = None
    memory_used_mb: float | None = None
    disk_used_percent: float | None = None
    # The node's network: bytes sent and received in all, and per second lately.
    net_sent_bytes: float | None = None
    net_recv_bytes: float | None = None
    net_sent_bytes_per_s: float | None = None
    net_recv_bytes_per_s: float | None = None
    isolation: str = ""  # how its steps are kept apart (see cicd_ray.worker.isolation)


class KeyRecord(BaseModel):
    """The run an Idempotency-Key made, and a digest of the request that made it."""

    run_id: str
    request: str = ""  # sha256 of the request; "" for keys stored before it was kept
    at: float = 0.0


class ResultRecord(BaseModel):
    """A success a step with `reuse: true` can take instead of running: by its key."""

    key: str
    origin: Origin
    artifacts: list[ArtifactFile] = Field(default_factory=list)
    at: float = 0.0


DeliveryState = Literal["pending", "sending", "delivered", "failed", "interrupted"]
OPEN_DELIVERY = ("pending", "sending")


class DeliveryRecord(BaseModel):
    """One notification of a run's end to one webhook: recorded with the run's end, marked
    `sending` before each try, so it is made at most once across master restarts (a try a
    restart interrupted is `interrupted`, not made again)."""

    id: str  # "<run id>/<index of the target>", "<run id>/status-start", "<run id>/status-end"
    run_id: str
    url: str
    kind: Literal["notify", "status"] = "notify"  # a webhook of its end; a commit status
    status: str = ""  # the commit status it sets, in the host's word
    state: DeliveryState = "pending"
    created_at: float
    next_at: float
    attempts: int = 0
    status_code: int | None = None
    error: str = ""
    finished_at: float | None = None


class RunSecrets(BaseModel):
    """A submission's own secrets: stored apart from the run (never in its record or view),
    given to the steps that list them, deleted once every step that lists one has ended (at
    the latest when the run ends)."""

    values: dict[str, str] = Field(default_factory=dict, repr=False)


class Caller(BaseModel):
    """Who asks the master to act: a token's id, its project and whether it is an admin's.
    The default is the cluster itself (a client with Ray access: `--address`, a Ray job)."""

    token_id: str = ""
    project: str = "default"
    admin: bool = True
    api: bool = False  # came through the HTTP API: its git sources are checked (CICD_RAY_GIT_ALLOW)

    def sees(self, project: str) -> bool:
        return self.admin or project == self.project


class AuditRecord(BaseModel):
    """Who did what to which run: submitted, cancelled, approved, rejected, re-ran."""

    at: float
    action: str
    run_id: str
    run_project: str
    token_id: str  # "" for the cluster itself
    project: str  # the caller's
    step: str = ""
    detail: str = ""


class Changes(BaseModel):
    """A batch of records to write together, in one transaction, before acting on any of them."""

    runs: dict[str, RunRecord] = Field(default_factory=dict)
    steps: dict[tuple[str, str], StepRecord] = Field(default_factory=dict)
    attempts: dict[str, AttemptRecord] = Field(default_factory=dict)
    workers: dict[str, WorkerRecord] = Field(default_factory=dict)
    logs: list[tuple[str, int, bytes]] = Field(default_factory=list)  # (attempt id, seq, data)
    idempotency: dict[str, KeyRecord] = Field(default_factory=dict)  # by Idempotency-Key
    results: dict[str, ResultRecord] = Field(default_factory=dict)  # by step key
    deliveries: dict[str, DeliveryRecord] = Field(default_factory=dict)  # by id
    run_secrets: dict[str, RunSecrets] = Field(default_factory=dict)  # by run id
    drop_run_secrets: list[str] = Field(default_factory=list)  # of runs that ended
    audit: list[AuditRecord] = Field(default_factory=list)
    schedules: dict[str, ScheduleRecord] = Field(default_factory=dict)  # by id
    drop_schedules: list[str] = Field(default_factory=list)  # ids

    def add(self, record: RunRecord | StepRecord | AttemptRecord | WorkerRecord) -> None:
        # Keyed, so a record changed twice in one batch is written once, in its last state.
        if isinstance(record, RunRecord):
            self.runs[record.id] = record
        elif isinstance(record, StepRecord):
            self.steps[(record.run_id, record.name)] = record
        elif isinstance(record, AttemptRecord):
            self.attempts[record.id] = record
        else:
            self.workers[record.id] = record

    def __bool__(self) -> bool:
        return bool(
            self.runs
            or self.steps
            or self.attempts
            or self.workers
            or self.logs
            or self.idempotency
            or self.results
            or self.deliveries
            or self.run_secrets
            or self.drop_run_secrets
            or self.audit
            or self.schedules
            or self.drop_schedules
        )
