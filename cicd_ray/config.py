"""Settings read from the environment, and the worker pools the master keeps.

Everything has a default that works on a laptop; a deployment sets the environment variables.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
)

from cicd_ray import tokens
from cicd_ray.errors import CicdError, IsolationError, SettingsError, quote
from cicd_ray.notify.webhooks import parse_allow
from cicd_ray.pipeline.model import (
    DEFAULT_MAX_PIPELINE_BYTES,
    DEFAULT_MAX_PLANNED_BYTES,
    WEBHOOK_URL,
)
from cicd_ray.pools import PoolConfig, ProjectConfig, default_pools, load_pools, load_projects
from cicd_ray.source import SOURCE_LIMIT_BYTES
from cicd_ray.triggers.cron import ScheduleSpec
from cicd_ray.triggers.repositories import RepoConfig, load_repos, load_schedules

# The settings read from the environment as numbers, and as on/off switches.
ENV_NUMBERS = {
    "CICD_RAY_HEARTBEAT_INTERVAL_S": "heartbeat_interval_s",
    "CICD_RAY_HEARTBEAT_TIMEOUT_S": "heartbeat_timeout_s",
    "CICD_RAY_LOG_CAP_BYTES": "log_cap_bytes",
    "CICD_RAY_LOG_RUN_MAX_BYTES": "log_run_max_bytes",
    "CICD_RAY_MAX_QUEUED_RUNS": "max_queued_runs",
    "CICD_RAY_KILL_GRACE_S": "kill_grace_s",
    "CICD_RAY_RETENTION_DAYS": "retention_days",
    "CICD_RAY_SOURCE_UNPACKED_LIMIT_BYTES": "source_unpacked_limit_bytes",
    "CICD_RAY_MAX_PIPELINE_BYTES": "max_pipeline_bytes",
    "CICD_RAY_MAX_PLANNED_BYTES": "max_planned_bytes",
    "CICD_RAY_MAX_BODY_BYTES": "max_body_bytes",
    "CICD_RAY_ARTIFACT_MAX_BYTES": "artifact_max_bytes",
    "CICD_RAY_ARTIFACT_RUN_MAX_BYTES": "artifact_run_max_bytes",
    "CICD_RAY_CACHE_MAX_BYTES": "cache_max_bytes",
    "CICD_RAY_SCHEDULE_MIN_INTERVAL_S": "schedule_min_interval_s",
    "CICD_RAY_MAX_SCHEDULES": "max_schedules_per_project",
}


ENV_SWITCHES = {
    "CICD_RAY_LOOKAHEAD": "lookahead",
    "CICD_RAY_KEEP_WORKSPACES": "keep_workspaces",
    "CICD_RAY_FAIR_SHARE": "fair_share",
}


def _switch(var: str, text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "on", "yes"):
        return True
    if word in ("0", "false", "off", "no"):
        return False
    raise SettingsError([f"{var}: {quote(text)}: expected 1 or 0 (true or false)"])


# The numeric users steps run as, one each at a time (cicd_ray.worker.isolation).
DEFAULT_STEP_UIDS = "200000-201023"


def parse_uids(text: str) -> range | None:
    """`200000-201023` (inclusive), or `off`: steps run as the worker's user."""
    text = text.strip()
    if text.lower() in ("off", "none", "0", ""):
        return None
    first, sep, last = text.partition("-")
    if not (sep and first.isdigit() and last.isdigit()) or not 1000 <= int(first) <= int(last):
        raise IsolationError(
            f"CICD_RAY_STEP_UIDS={text!r}: expected FIRST-LAST (numeric "
            "user ids of 1000 or more, e.g. 200000-201023) or off"
        )
    return range(int(first), int(last) + 1)


class Settings(BaseModel):
    """Runtime settings shared by the master, the workers, the API and the CLI: every
    CICD_RAY_* variable is read here (`from_env`), and only here."""

    home: Path
    pools: dict[str, PoolConfig] = Field(default_factory=default_pools)
    heartbeat_interval_s: float = Field(2.0, gt=0)
    heartbeat_timeout_s: float = Field(15.0, gt=0)
    log_cap_bytes: int = Field(5 * 1024 * 1024, ge=1)
    # All of one run's logs (cicd_ray.master.logbudget).
    log_run_max_bytes: int = Field(1024**3, ge=1)
    # A project's runs not yet started, unless the projects file gives it its own quota.
    max_queued_runs: int = Field(1000, ge=1)
    log_flush_interval_s: float = Field(0.25, gt=0)
    kill_grace_s: float = Field(3.0, ge=0)
    keep_workspaces: bool = False
    source_limit_bytes: int = Field(SOURCE_LIMIT_BYTES, ge=1)
    # The most a source archive may unpack to, and the most members it may hold.
    source_unpacked_limit_bytes: int = Field(2 * 1024 * 1024 * 1024, ge=1)
    source_max_members: int = Field(100_000, ge=1)
    # Numeric users for steps when the worker is root ("off": the worker's user); see isolation.
    step_uids: str = DEFAULT_STEP_UIDS
    # Finished runs (with logs), stopped workers and unneeded sources older than this are
    # deleted by the master (0: kept forever); see cicd_ray.store.retention.
    retention_days: float = Field(30.0, ge=0)

    store: str | None = None  # a store URL; None: the SQLite file under `home`
    # Where artifacts and caches are kept (file://... or s3://bucket/prefix); None: a folder
    # under `home`. Limits: one artifact file, all of a run's, all caches (and each node's copy).
    artifacts: str | None = None
    artifact_max_bytes: int = Field(2 * 1024**3, ge=1)
    artifact_run_max_bytes: int = Field(20 * 1024**3, ge=1)
    cache_max_bytes: int = Field(10 * 1024**3, ge=1)
    # Custom Ray resources the master asks for, e.g. {"cicd-control": 0.01}: with a resource
    # only worker nodes carry, the master stays off the head node and outlives its replacement.
    master_resources: dict[str, float] = Field(default_factory=dict)
    # Workers reserve their pool's memory from Ray (the autoscaler sizes nodes by it); off on
    # the local autoscaling cluster, whose fake node types cannot declare memory.
    reserve_memory: bool = True
    # Ask the autoscaler for the capacity of steps whose needs are running, before they are
    # ready (CICD_RAY_LOOKAHEAD=0 turns it off).
    lookahead: bool = True
    # The largest pipeline text and HTTP request body accepted.
    max_pipeline_bytes: int = Field(DEFAULT_MAX_PIPELINE_BYTES, ge=1)
    max_planned_bytes: int = Field(DEFAULT_MAX_PLANNED_BYTES, ge=1)  # a run's steps, planned
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)
    # Projects' weights and quotas (CICD_RAY_PROJECTS), and whether contended pools are
    # shared between projects by weight (CICD_RAY_FAIR_SHARE) or taken in submission order.
    projects: dict[str, ProjectConfig] = Field(default_factory=dict)
    fair_share: bool = True
    # The git repositories whose webhooks start runs (CICD_RAY_REPOS;
    # cicd_ray.triggers.repositories).
    repos: dict[str, RepoConfig] = Field(default_factory=dict)
    repos_file: Path | None = None
    schedules: list[ScheduleSpec] = Field(default_factory=list)  # the same file's
    # Schedules made through the API: the shortest interval between slots, and how many one
    # project may have.
    schedule_min_interval_s: float = Field(60.0, ge=0)
    max_schedules_per_project: int = Field(100, ge=1)
    # What the API's tokens may do, by their digests (CICD_RAY_TOKENS, CICD_RAY_TOKEN_DIGESTS;
    # see cicd_ray.tokens): never the tokens themselves; and the tokens file, which the API
    # reads again when it changes (`token_book`).
    token_grants: list[tokens.Grant] = Field(default_factory=list)
    tokens_file: Path | None = None
    # Notifications: the key that signs them, the internal hosts or networks they may go to
    # (cicd_ray.notify.webhooks), and a webhook told of the failed runs of pipelines without
    # `notify:`.
    webhook_secret: str = Field("", repr=False)
    # Where projects' secrets are: <dir>/<project>/<NAME>, read by workers (cicd_ray.secrets).
    secrets_dir: Path | None = None
    webhook_allow: list[str] = Field(default_factory=list)
    # What git sources submitted through the API may name beyond public hosts: internal
    # hosts or networks, and `file` for local repositories (CICD_RAY_GIT_ALLOW).
    git_allow: list[str] = Field(default_factory=list)
    notify_webhook: str | None = None
    # Where the Python client finds the API, and the token it presents (also the base of the
    # links to a run's page in notifications).
    url: str | None = None
    token: str = Field("", repr=False)

    def __getstate__(self) -> dict:
        # The client's token stays in the process that read it: the settings travel to the
        # master and the workers (pickled by Ray), and no one there needs it.
        state = super().__getstate__()
        state["__dict__"] = {**state["__dict__"], "token": ""}
        return state

    def for_workers(self) -> Settings:
        """What workers are given: not the key that signs notifications (only the master
        sends them; a step running as the worker's user could read its memory)."""
        return self.model_copy(update={"webhook_secret": ""})

    def token_book(self) -> tokens.TokenBook:
        return tokens.TokenBook(self.token_grants, self.tokens_file)

    @property
    def store_path(self) -> Path:
        return self.home / "cicd.sqlite3"

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{self.store_path}"

    @property
    def artifacts_url(self) -> str:
        return self.artifacts or f"file://{self.home / 'artifacts'}"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """The settings from `env` (default: this process's environment). SettingsError names
        each malformed variable."""
        env = dict(os.environ if env is None else env)
        home = Path(env.get("CICD_RAY_HOME") or Path.home() / ".cicd-ray").expanduser()
        values: dict[str, object] = {
            "home": home,
            "store": env.get("CICD_RAY_STORE") or None,
            "artifacts": env.get("CICD_RAY_ARTIFACTS") or None,
            "url": env.get("CICD_RAY_URL") or None,
            "token": env.get("CICD_RAY_TOKEN", ""),
            "webhook_secret": env.get("CICD_RAY_WEBHOOK_SECRET", ""),
            "notify_webhook": env.get("CICD_RAY_NOTIFY_WEBHOOK") or None,
            "secrets_dir": env.get("CICD_RAY_SECRETS_DIR") or None,
            "tokens_file": env.get("CICD_RAY_TOKENS_FILE") or None,
        }
        values.update(_files(env))
        for var, field in ENV_NUMBERS.items():
            if env.get(var):
                values[field] = env[var]
        values.update(_structured(env))
        for var, field in ENV_SWITCHES.items():
            if env.get(var):
                values[field] = _switch(var, env[var])
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            variables = {field: var for var, field in ENV_NUMBERS.items()}
            variables["master_resources"] = "CICD_RAY_MASTER_RESOURCES"
            problems = []
            for error in e.errors():
                field = str(error["loc"][0]) if error["loc"] else ""
                problems.append(
                    f"{variables.get(field, field)}: {quote(error.get('input'))}: {error['msg']}"
                )
            raise SettingsError(problems) from None


def _files(env: dict[str, str]) -> dict[str, object]:
    """The settings read from files the variables name: pools, projects, repositories (and
    their schedules), tokens. SpecError or SettingsError names the file and the problem."""
    values: dict[str, object] = {}
    if env.get("CICD_RAY_POOLS"):
        values["pools"] = load_pools(env["CICD_RAY_POOLS"])
    if env.get("CICD_RAY_PROJECTS"):
        values["projects"] = load_projects(env["CICD_RAY_PROJECTS"])
    if env.get("CICD_RAY_REPOS"):
        values["repos_file"] = env["CICD_RAY_REPOS"]
        if os.path.lexists(env["CICD_RAY_REPOS"]):  # (not there: no repositories)
            values["repos"] = repos = load_repos(env["CICD_RAY_REPOS"])
            values["schedules"] = load_schedules(env["CICD_RAY_REPOS"], repos)
    try:
        values["token_grants"] = tokens.env_grants(env)
        tokens_file = env.get("CICD_RAY_TOKENS_FILE")
        # Read here so that a bad one stops a start; one not there (yet) holds no tokens
        # (`token create` makes it; the API reads it once it is there).
        if tokens_file and os.path.lexists(tokens_file):
            tokens.read_tokens_file(Path(tokens_file))
    except CicdError as e:
        raise SettingsError([str(e)]) from None
    return values


def _structured(env: dict[str, str]) -> dict[str, object]:
    """The variables with a shape of their own: master resources (JSON), step users."""
    values: dict[str, object] = {}
    for var, field in (
        ("CICD_RAY_WEBHOOK_ALLOW", "webhook_allow"),
        ("CICD_RAY_GIT_ALLOW", "git_allow"),
    ):
        try:
            values[field] = parse_allow(env.get(var, ""))
        except ValueError as e:
            raise SettingsError([f"{var}: {e}"]) from None
    url = env.get("CICD_RAY_NOTIFY_WEBHOOK")
    if url and not re.match(WEBHOOK_URL, url):
        raise SettingsError([f"CICD_RAY_NOTIFY_WEBHOOK: {quote(url)} is not an http(s) URL"])
    if env.get("CICD_RAY_MASTER_RESOURCES"):
        try:
            values["master_resources"] = json.loads(env["CICD_RAY_MASTER_RESOURCES"])
        except ValueError as e:
            raise SettingsError(
                [
                    f"CICD_RAY_MASTER_RESOURCES: {e}; expected a JSON object "
                    'such as {"cicd-control": 0.01}'
                ]
            ) from None
    if env.get("CICD_RAY_STEP_UIDS"):
        try:
            parse_uids(env["CICD_RAY_STEP_UIDS"])
        except IsolationError as e:
            raise SettingsError([str(e)]) from None
        values["step_uids"] = env["CICD_RAY_STEP_UIDS"]
    return values


@dataclass
class Ha:
    """Ray's GCS fault tolerance: the GCS keeps its tables in this Redis, so a restarted GCS or
    a replaced head finds the cluster (nodes, actors, the master) where it was."""

    redis_address: str  # host:port
    password: str | None = None
    namespace: str = "cicd-ray"
    # How long raylets and workers wait for the GCS before giving up: longer than a head
    # restart takes (Ray's default is 60 s).
    reconnect_timeout_s: int = 120

    @classmethod
    def from_url(cls, url: str, namespace: str = "cicd-ray") -> Ha:
        """`redis://[:password@]host:port` or `host:port`."""
        found = re.fullmatch(r"(?:rediss?://)?(?::([^@]*)@)?([^:/@]+):(\d+)/?(\d*)", url.strip())
        if not found:
            raise CicdError(f"--ha {url!r}: expected redis://[:PASSWORD@]HOST:PORT or HOST:PORT")
        password, host, port = found.group(1), found.group(2), found.group(3)
        return cls(redis_address=f"{host}:{port}", password=password or None, namespace=namespace)

    def env(self) -> dict[str, str]:
        """What the head's processes need in their environment (Ray reads RAY_* settings)."""
        return {
            "RAY_REDIS_ADDRESS": self.redis_address,
            "RAY_external_storage_namespace": self.namespace,
            "RAY_gcs_rpc_server_reconnect_timeout_s": str(self.reconnect_timeout_s),
        }
