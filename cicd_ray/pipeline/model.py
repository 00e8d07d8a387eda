"""The pipeline file's models: what a user writes (`PipelineSpec`, `StepSpec` and their parts)
and what a plan makes of it (`PlannedStep`), with the limits every field is held to.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

from cicd_ray.errors import brief, quote

PIPELINE_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"


STEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


MATRIX_KEY = r"^[A-Za-z_][A-Za-z0-9_]{0,30}$"


RESERVED_ENV_PREFIX = "CICD_"


MAX_TIMEOUT_S = 7 * 24 * 3600
# Attempts lost with their worker retried automatically (cicd_ray.scheduler.retries).
DEFAULT_INFRA_RETRIES = 2


# A matrix value becomes part of a step name, a URL and a folder: a safe set of characters.
MATRIX_VALUE = r"^[A-Za-z0-9._+@:-]{1,64}$"


MAX_MATRIX_VARIANTS = 256


MAX_PLANNED_STEPS = 5_000  # steps of one run, matrix variants included


MAX_NEED_EDGES = 100_000  # needs of one run once matrices are expanded (a 256 x 256 fan-in fits)


DEFAULT_MAX_PIPELINE_BYTES = 1024 * 1024


# A step's environment: one value, and all of one step's (the pipeline's, the step's and the
# submission's together). Every planned step carries its env: without a cap a 1 MiB env
# times 5,000 steps is 5 GiB in the store.
MAX_ENV_VALUE_BYTES = 32 * 1024


MAX_ENV_BYTES = 128 * 1024


DEFAULT_MAX_PLANNED_BYTES = 64 * 1024 * 1024  # a run's planned steps, scripts and envs


RetryOn = Literal["infra", "failure", "timeout"]


EnvName = Annotated[str, StringConstraints(pattern=ENV_NAME)]


Env = dict[EnvName, Annotated[str, Field(strict=True, max_length=MAX_ENV_VALUE_BYTES)]]


def _matrix_values(values: object) -> object:
    """A matrix's values as the text that names their variants: numbers as they were written
    (`3.10` stays "3.10"), booleans as `true`/`false`. Two values naming the same variant, or a
    value outside the safe set of characters, is an error naming it."""
    if not isinstance(values, list):
        return values  # pydantic names the wrong type
    out: list[object] = []
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            text = getattr(value, "yaml_text", None) or str(value)
        else:
            out.append(value)  # pydantic names the wrong type
            continue
        if not re.match(MATRIX_VALUE, text):
            raise ValueError(
                f"value [{i}] {quote(value)} may hold only letters, digits and "
                ". _ + @ : - (1 to 64 of them): it names a step, a URL and a folder"
            )
        if text in seen:
            j = seen[text]
            raise ValueError(
                f"values [{j}] {quote(values[j])} and [{i}] {quote(value)} both "
                f"name the variant {text!r}; make them distinct"
            )
        seen[text] = i
        out.append(text)
    return out


MatrixValues = Annotated[
    list[Annotated[str, Field(strict=True)]], BeforeValidator(_matrix_values), Field(min_length=1)
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrySpec(_Model):
    max: int = Field(0, ge=0, le=20)
    on: list[RetryOn] = Field(default_factory=lambda: ["infra", "failure"])
    # Retries after the step's worker or node was lost, not counted in `max`.
    infra: int = Field(DEFAULT_INFRA_RETRIES, ge=0, le=20)


MIN_CPU = 0.01  # a step reserves at least this much: 1e-300 would stack without end


class ResourcesSpec(_Model):
    cpu: float = Field(1.0, ge=MIN_CPU, le=1024)
    memory_mb: int = Field(256, ge=0, le=4 * 1024 * 1024)


GIT_URL = r"^(https?://|ssh://|file://|git@[A-Za-z0-9.-]+:)[^\s]+$"


GIT_REF = r"^[A-Za-z0-9._/][A-Za-z0-9._/-]{0,199}$"  # never starts with "-": not an option


def without_credentials(url: str) -> str:
    """A git URL as it may be stored and shown: an http(s) URL loses its user and password
    (`https://TOKEN@host/...` carries a token), any other keeps its user (`ssh://git@...`) but
    not a password. Workers fetch private repositories with their own credential helper."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url  # git@host:path: a user, never a password
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return url
    userinfo, _, host = authority.rpartition("@")
    if scheme in ("http", "https"):
        return f"{scheme}://{host}{slash}{path}"
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}@{host}{slash}{path}"


class GitSource(_Model):
    """A repository the worker clones into every step's workspace, at `ref`."""

    git: Annotated[str, StringConstraints(pattern=GIT_URL), AfterValidator(without_credentials)]
    ref: Annotated[str, StringConstraints(pattern=GIT_REF)] = "HEAD"


def _workspace_path(text: str) -> str:
    """A path or glob inside the step's workspace (`~/...`: inside its HOME, for caches)."""
    body = text[2:] if text.startswith("~/") else text
    if not body or body.startswith("/") or ".." in body.split("/"):
        raise ValueError(
            f"{quote(text)} must be a relative path inside the workspace (no leading /, no ..)"
        )
    return text


WorkspacePath = Annotated[
    str, StringConstraints(min_length=1, max_length=256), AfterValidator(_workspace_path)
]


def _cache_key(text: str) -> str:
    from cicd_ray.pipeline.cachekeys import check_template

    problem = check_template(text)
    if problem:
        raise ValueError(problem)
    return text


CacheKey = Annotated[
    str, StringConstraints(min_length=1, max_length=512), AfterValidator(_cache_key)
]


class CacheSpec(_Model):
    """Folders kept from one run to the next under a key (docs/pipelines.md, "Caches")."""

    key: CacheKey
    paths: Annotated[list[WorkspacePath], Field(min_length=1, max_length=32)]
    restore_keys: Annotated[list[CacheKey], Field(max_length=16)] = Field(default_factory=list)


def _condition(text: str) -> str:
    from cicd_ray.pipeline.conditions import ConditionError, parse

    try:
        parse(text)  # the step's matrix keys are checked with the whole step (_conditions)
    except ConditionError as e:
        raise ValueError(f"{quote(brief(text))}: {e}") from None
    return text


GROUP = r"^[A-Za-z0-9._${}/:-]{1,200}$"  # `${NAME}` expands from the run's env at submission


class ConcurrencySpec(_Model):
    """At most `limit` runs (or steps) of a group active at once, cluster-wide."""

    group: Annotated[str, StringConstraints(pattern=GROUP)]
    limit: int = Field(1, ge=1, le=1000)
    cancel_in_progress: bool = False


class ApprovalSpec(_Model):
    """A person releases (or rejects) the step before it goes on."""

    prompt: Annotated[str, StringConstraints(min_length=1, max_length=500)] = "Approve?"


NotifyWhen = Literal["failed", "succeeded", "cancelled"]


# No user or password in it: the URL is stored and shown with the run.
WEBHOOK_URL = r"^https?://[^\s/?#@]+(/[^\s]*)?$"


class NotifySpec(_Model):
    """Where to POST a signed JSON document when a run ends in one of the `when` states."""

    webhook: Annotated[str, StringConstraints(pattern=WEBHOOK_URL, max_length=2048)]
    when: Annotated[list[NotifyWhen], Field(min_length=1)] = Field(
        default_factory=lambda: ["failed"]
    )


class DefaultsSpec(_Model):
    timeout: float = Field(600, gt=0, le=MAX_TIMEOUT_S)
    pool: Annotated[str, StringConstraints(pattern=PIPELINE_NAME)] = "default"
    retry: RetrySpec = Field(default_factory=RetrySpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)


class StepSpec(_Model):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, StringConstraints(pattern=STEP_NAME)]
    # Required, unless the step is only an approval.
    run: Annotated[str, StringConstraints(min_length=1)] | None = None
    needs: list[str] = Field(default_factory=list)
    matrix: dict[Annotated[str, StringConstraints(pattern=MATRIX_KEY)], MatrixValues] = Field(
        default_factory=dict
    )
    env: Env = Field(default_factory=dict)
    pool: Annotated[str, StringConstraints(pattern=PIPELINE_NAME)] | None = None
    resources: ResourcesSpec | None = None
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S)
    retry: RetrySpec | None = None
    priority: int = Field(0, ge=-1000, le=1000)
    # True: may run on a spot pool standing in for its own (cheaper, can be taken away); an
    # infra failure there sends the retry to its own pool. False, written out: a newer run of
    # its concurrency group with cancel_in_progress lets it finish.
    interruptible: bool | None = None
    # Files kept after success and handed to the steps that need this one (globs).
    artifacts: Annotated[list[WorkspacePath], Field(max_length=64)] = Field(default_factory=list)
    cache: Annotated[list[CacheSpec], Field(max_length=8)] = Field(default_factory=list)
    # Skip the step when a success with the same inputs exists (see cicd_ray.scheduler.reuse).
    reuse: bool = False
    # Run only when this holds (cicd_ray.pipeline.conditions); default: every need succeeded.
    if_: Annotated[str, StringConstraints(max_length=1000), AfterValidator(_condition)] | None = (
        Field(None, alias="if")
    )
    concurrency: ConcurrencySpec | None = None
    approval: ApprovalSpec | None = None
    # The project's secrets it gets, as environment variables (cicd_ray.secrets).
    secrets: Annotated[list[EnvName], Field(max_length=32)] = Field(default_factory=list)


class PipelineSpec(_Model):
    name: Annotated[str, StringConstraints(pattern=PIPELINE_NAME)]
    source: str | GitSource | None = None
    env: Env = Field(default_factory=dict)
    defaults: DefaultsSpec = Field(default_factory=DefaultsSpec)
    concurrency: ConcurrencySpec | None = None
    notify: Annotated[list[NotifySpec], Field(max_length=16)] = Field(default_factory=list)
    steps: Annotated[list[StepSpec], Field(min_length=1)]


class PlannedStep(BaseModel):
    """One concrete step of a run: a matrix variant with defaults applied and needs resolved."""

    name: str
    base: str
    index: int
    run: str | None
    needs: list[str]
    matrix: dict[str, str]
    env: dict[str, str]
    pool: str
    cpu: float
    memory_mb: int
    timeout_s: float
    retry_max: int
    retry_on: list[RetryOn]
    retry_infra: int = DEFAULT_INFRA_RETRIES
    priority: int
    interruptible: bool = False
    artifacts: list[str] = Field(default_factory=list)
    cache: list[CacheSpec] = Field(default_factory=list)
    reuse: bool = False
    condition: str = ""  # `if:`; "" is success()
    concurrency: ConcurrencySpec | None = None  # its group expanded from the step's env
    approval: ApprovalSpec | None = None
    let_finish: bool = False  # `interruptible: false` written out: cancel_in_progress spares it
    secrets: list[str] = Field(default_factory=list)  # names only: values never leave workers
