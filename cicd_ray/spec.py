"""The pipeline file: pydantic models, loading, matrix expansion and DAG checks.

What the user wrote is a *Spec* (`PipelineSpec`, `StepSpec`); `plan()` turns it into the concrete
steps the scheduler runs (`PlannedStep`), one per matrix variant, with defaults applied and needs
resolved to full names. Every problem is reported at once, each naming its field path.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from cicd_ray import yamldoc
from cicd_ray.errors import SpecError, brief, quote
from cicd_ray.retries import DEFAULT_INFRA_RETRIES

PIPELINE_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
STEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
MATRIX_KEY = r"^[A-Za-z_][A-Za-z0-9_]{0,30}$"
RESERVED_ENV_PREFIX = "CICD_"
MAX_TIMEOUT_S = 7 * 24 * 3600
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
            raise ValueError(f"value [{i}] {quote(value)} may hold only letters, digits and "
                             ". _ + @ : - (1 to 64 of them): it names a step, a URL and a folder")
        if text in seen:
            j = seen[text]
            raise ValueError(f"values [{j}] {quote(values[j])} and [{i}] {quote(value)} both "
                             f"name the variant {text!r}; make them distinct")
        seen[text] = i
        out.append(text)
    return out


MatrixValues = Annotated[list[Annotated[str, Field(strict=True)]],
                         BeforeValidator(_matrix_values), Field(min_length=1)]


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
        raise ValueError(f"{quote(text)} must be a relative path inside the workspace "
                         "(no leading /, no ..)")
    return text


WorkspacePath = Annotated[str, StringConstraints(min_length=1, max_length=256),
                          AfterValidator(_workspace_path)]


def _cache_key(text: str) -> str:
    from cicd_ray.cachekeys import check_template

    problem = check_template(text)
    if problem:
        raise ValueError(problem)
    return text


CacheKey = Annotated[str, StringConstraints(min_length=1, max_length=512),
                     AfterValidator(_cache_key)]


class CacheSpec(_Model):
    """Folders kept from one run to the next under a key (docs/pipelines.md, "Caches")."""

    key: CacheKey
    paths: Annotated[list[WorkspacePath], Field(min_length=1, max_length=32)]
    restore_keys: Annotated[list[CacheKey], Field(max_length=16)] = Field(default_factory=list)


def _condition(text: str) -> str:
    from cicd_ray.conditions import ConditionError, parse

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
        default_factory=lambda: ["failed"])


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
        default_factory=dict)
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
    artifacts: Annotated[list[WorkspacePath], Field(max_length=64)] = Field(
        default_factory=list)
    cache: Annotated[list[CacheSpec], Field(max_length=8)] = Field(default_factory=list)
    # Skip the step when a success with the same inputs exists (see cicd_ray.keys).
    reuse: bool = False
    # Run only when this holds (cicd_ray.conditions); default: every need succeeded.
    if_: Annotated[str, StringConstraints(max_length=1000), AfterValidator(_condition)] | None \
        = Field(None, alias="if")
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


# --- loading --------------------------------------------------------------------------------


def load_pipeline(path: str | Path,
                  max_bytes: int = DEFAULT_MAX_PIPELINE_BYTES) -> PipelineSpec:
    """Read and validate a pipeline file; raise SpecError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([f"cannot read {p}: {e.strerror}"], source=str(p)) from None
    return parse_pipeline(text, source=str(p), max_bytes=max_bytes)


def load_yaml(text: str, source: str = "pipeline",
              max_bytes: int = DEFAULT_MAX_PIPELINE_BYTES) -> Any:
    """YAML text as cicd-ray reads every pipeline: 1.2 core scalars, bounded (see yamldoc);
    `max_bytes` is the settings' `max_pipeline_bytes` (CICD_RAY_MAX_PIPELINE_BYTES)."""
    return yamldoc.load(text, source=source, max_bytes=max_bytes)


def parse_pipeline(doc: str | dict[str, Any], source: str = "pipeline",
                   max_bytes: int = DEFAULT_MAX_PIPELINE_BYTES,
                   measure_objects: bool = False) -> PipelineSpec:
    """Validate a pipeline given as YAML text or as an already-parsed mapping. With
    `measure_objects` (a mapping sent by a client: the API's), the mapping is held to
    `max_bytes` as compact JSON too; the cluster's own callers send a loaded model's dump,
    whose defaults spelled out weigh more than the text they came from."""
    if isinstance(doc, str):
        doc = load_yaml(doc, source=source, max_bytes=max_bytes)
    else:
        yamldoc.check_shape(doc, source=source)
        if measure_objects:
            size = len(json.dumps(doc, default=str, separators=(",", ":")).encode())
            if size > max_bytes:
                raise SpecError([f"(document): {size} bytes as JSON is more than the "
                                 f"{max_bytes} byte limit (CICD_RAY_MAX_PIPELINE_BYTES)"],
                                source=source)
    if not isinstance(doc, dict):
        got = type(doc).__name__ if doc is not None else "an empty document"
        raise SpecError(
            [f"(top level): expected a mapping with 'name' and 'steps', got {got}"], source=source
        )
    try:
        spec = PipelineSpec.model_validate(doc)
    except ValidationError as e:
        raise SpecError(_describe(e, doc), source=source) from None
    problems = check_graph(spec)
    if problems:
        raise SpecError(problems, source=source)
    return spec


def _path(loc: tuple[Any, ...], doc: dict[str, Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    # Name the step too, when it has one: "steps[2] (test).timeout" reads better than an index.
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        steps = doc.get("steps")
        if isinstance(steps, list) and loc[1] < len(steps) and isinstance(steps[loc[1]], dict):
            name = steps[loc[1]].get("name")
            if isinstance(name, str):
                out = out.replace(f"steps[{loc[1]}]", f"steps[{loc[1]}] ({name})", 1)
    return out or "(top level)"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model whose field set applies at `loc` (for naming allowed keys of an unknown key)."""
    model: type[BaseModel] | None = PipelineSpec
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = next((m for m in _models_in(field.annotation)), None)
    return model


def keys_of(model: type[BaseModel]) -> list[str]:
    """The keys a model accepts, as written in YAML (`if`, not `if_`)."""
    return [field.alias or name for name, field in model.model_fields.items()]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "GitSource"})


def _is_union_tag(part: object) -> bool:
    """Pydantic names the union member an error belongs to in its location."""
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part)


def _describe(error: ValidationError, doc: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for err in error.errors():
        tags = [p for p in err["loc"] if _is_union_tag(p)]
        # A union member that does not fit the kind of value given says nothing useful:
        # for `source: {git: ...}` only the GitSource errors matter, not "not a string".
        if tags and err["type"] == "string_type" and isinstance(err.get("input"), dict):
            continue
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        where = brief(_path(loc, doc))
        kind = err["type"]
        if kind == "extra_forbidden":
            model = _model_at(loc)
            allowed = ", ".join(keys_of(model)) if model else "see docs/pipelines.md"
            problems.append(f"{where}: unknown key; allowed keys are: {allowed}")
        elif kind == "missing":
            problems.append(f"{where}: required field is missing")
        elif kind == "string_pattern_mismatch":
            pattern = err.get("ctx", {}).get("pattern", "")
            problems.append(f"{where}: {quote(err['input'])} does not match {pattern}")
        elif kind == "too_short" and loc == ("steps",):
            problems.append("steps: must list at least one step")
        elif kind == "value_error":
            problems.append(f"{where}: {err['ctx']['error']}")
        else:
            hint = " (quote it in YAML)" if kind == "string_type" else ""
            problems.append(f"{where}: {err['msg']}, got {quote(err.get('input'))}{hint}")
    return problems


# --- DAG checks and expansion ---------------------------------------------------------------


def check_graph(spec: PipelineSpec) -> list[str]:
    """Problems that span steps: duplicates, unknown needs, reserved env, sizes, cycles.

    Sizes are counted before anything is expanded: a few lines of matrix can name millions of
    variants, and a run's needs grow with the product of its matrices.
    """
    counts = {step.name: _variant_count(step) for step in spec.steps}
    problems = (_duplicates(spec) + _reserved_env(spec) + _env_sizes(spec)
                + _matrix_sizes(spec, counts) + _controls(spec))
    if problems:
        return problems  # too big to expand, or names that are not unique
    problems = _check_sizes(spec, counts) or _unknown_needs(spec)
    if not problems:
        cycle = _find_cycle(spec)
        if cycle:
            problems.append(f"steps: the needs form a cycle: {brief(' -> '.join(cycle))}")
    return problems


def _duplicates(spec: PipelineSpec) -> list[str]:
    problems, seen = [], {}
    for i, step in enumerate(spec.steps):
        if step.name in seen:
            problems.append(f"steps[{i}] ({step.name}).name: duplicate step name, "
                            f"already used by steps[{seen[step.name]}]")
        seen.setdefault(step.name, i)
    return problems


def _env_sizes(spec: PipelineSpec) -> list[str]:
    problems = []
    for i, step in enumerate(spec.steps):
        size = env_bytes({**spec.env, **step.env})
        if size > MAX_ENV_BYTES:
            problems.append(f"steps[{i}] ({step.name}).env: with the pipeline's env, {size} "
                            f"bytes is more than the {MAX_ENV_BYTES} a step's env may have")
    return problems


def _reserved_env(spec: PipelineSpec) -> list[str]:
    places = [("env", spec.env)] + [(f"steps[{i}] ({s.name}).env", s.env)
                                    for i, s in enumerate(spec.steps)]
    return [f"{where}.{key}: names starting with {RESERVED_ENV_PREFIX} are reserved for "
            "cicd-ray; rename it"
            for where, env in places for key in env if key.startswith(RESERVED_ENV_PREFIX)]


def _controls(spec: PipelineSpec) -> list[str]:
    """Per step: something to do, a condition over its own matrix keys, group names that
    expand."""
    from cicd_ray.conditions import ConditionError, parse

    problems = []
    groups = [("concurrency.group", spec.concurrency)]
    for i, step in enumerate(spec.steps):
        where = f"steps[{i}] ({step.name})"
        if step.run is None and step.approval is None:
            problems.append(f"{where}: needs `run` (a script), `approval`, or both")
        if step.if_ is not None:
            try:
                parse(step.if_, frozenset(step.matrix))
            except ConditionError as e:
                problems.append(f"{where}.if: {quote(brief(step.if_))}: {e}")
        groups.append((f"{where}.concurrency.group", step.concurrency))
        problems += [f"{where}.secrets: {name} is also in env; a secret must not be"
                     for name in step.secrets if name in {**spec.env, **step.env}]
        problems += [f"{where}.secrets: {name}: names starting with {RESERVED_ENV_PREFIX} "
                     "are reserved for cicd-ray" for name in step.secrets
                     if name.startswith(RESERVED_ENV_PREFIX)]
    for where, concurrency in groups:
        if concurrency is not None:
            problems += [f"{where}: {p}" for p in _template_problems(concurrency.group)]
    return problems


_VARIABLE = re.compile(r"\$\{([^}]*)\}")


def _template_problems(template: str) -> list[str]:
    rest = _VARIABLE.sub("", template)
    problems = [f"${{{name}}} is not a variable name" for name in _VARIABLE.findall(template)
                if not re.match(ENV_NAME, name)]
    if "$" in rest or "{" in rest or "}" in rest:
        problems.append(f"{quote(template)}: write a variable as ${{NAME}}")
    return problems


def expand(template: str, env: dict[str, str], where: str, strict: bool = True) -> str:
    """`${NAME}` replaced from `env`; a name it does not set is a SpecError naming it (left as
    written when not `strict`: validating a file, before the env of a submission is known)."""
    missing = [name for name in _VARIABLE.findall(template) if name not in env]
    if missing and not strict:
        return _VARIABLE.sub(lambda m: env.get(m.group(1), m.group(0)), template)
    if missing:
        raise SpecError([f"{where}: ${{{missing[0]}}} is not set in the run's env; set it in "
                         "the pipeline's env or when submitting"])
    return _VARIABLE.sub(lambda m: env[m.group(1)], template)


def expanded(concurrency: ConcurrencySpec | None, env: dict[str, str], where: str,
             strict: bool = True) -> ConcurrencySpec | None:
    if concurrency is None:
        return None
    return concurrency.model_copy(update={"group": expand(concurrency.group, env, where,
                                                         strict)})


def _matrix_sizes(spec: PipelineSpec, counts: dict[str, int]) -> list[str]:
    return [f"steps[{i}] ({step.name}).matrix: expands to {counts[step.name]} variants, more "
            f"than the {MAX_MATRIX_VARIANTS} allowed"
            for i, step in enumerate(spec.steps) if counts[step.name] > MAX_MATRIX_VARIANTS]


def _unknown_needs(spec: PipelineSpec) -> list[str]:
    names = {step.name for step in spec.steps}
    variants = {full for step in spec.steps for full, _ in _variants(step)}
    known = ", ".join(sorted(names)) or "(none)"
    return [f"steps[{i}] ({step.name}).needs[{j}]: unknown step {quote(need)}; known steps "
            f"are: {brief(known)}"
            for i, step in enumerate(spec.steps) for j, need in enumerate(step.needs)
            if need not in names and need not in variants]


def _variant_count(step: StepSpec) -> int:
    count = 1
    for values in step.matrix.values():
        count *= len(values)
    return count


def _check_sizes(spec: PipelineSpec, counts: dict[str, int]) -> list[str]:
    """The run's planned steps and need edges against their limits, counted, not built."""
    total = sum(counts.values())
    if total > MAX_PLANNED_STEPS:
        return [f"steps: the run would have {total} steps once matrices are expanded, more "
                f"than the {MAX_PLANNED_STEPS} allowed"]
    edges = sum(counts[s.name] * sum(counts.get(n, 1) for n in set(s.needs)) for s in spec.steps)
    if edges > MAX_NEED_EDGES:
        return [f"steps: the needs would link {edges} pairs of steps once matrices are "
                f"expanded, more than the {MAX_NEED_EDGES} allowed; need fewer variants"]
    return []


def _base_of(need: str) -> str:
    return need.split("[", 1)[0]


def _find_cycle(spec: PipelineSpec) -> list[str] | None:
    """A cycle of needs, if there is one (a walk with its own stack: a long chain of needs
    must not exhaust Python's)."""
    edges = {s.name: [_base_of(n) for n in s.needs] for s in spec.steps}
    color: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in edges:
        if start in color:
            continue
        color[start] = 1
        path = [start]
        todo = [iter(edges[start])]
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                color[path.pop()] = 2
                todo.pop()
            elif color.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif nxt not in color:
                color[nxt] = 1
                path.append(nxt)
                todo.append(iter(edges.get(nxt, [])))
    return None


def _variants(step: StepSpec) -> list[tuple[str, dict[str, str]]]:
    if not step.matrix:
        return [(step.name, {})]
    keys = list(step.matrix)
    out = []
    for combo in itertools.product(*(step.matrix[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        label = ",".join(f"{k}={v}" for k, v in values.items())
        out.append((f"{step.name}[{label}]", values))
    return out


def check_env_overrides(env: dict[str, str]) -> list[str]:
    """Problems with submission-time env overrides (same rules as the pipeline's env)."""
    problems = []
    for key, value in env.items():
        if not re.match(ENV_NAME, key):
            problems.append(f"env.{key}: not a valid variable name; use letters, digits and _")
        elif key.startswith(RESERVED_ENV_PREFIX):
            problems.append(f"env.{key}: names starting with {RESERVED_ENV_PREFIX} are reserved")
        if not isinstance(value, str):
            problems.append(f"env.{key}: values must be strings, got {value!r}")
        elif (size := len(value.encode())) > MAX_ENV_VALUE_BYTES:
            problems.append(f"env.{key}: {size} bytes is more than the "
                            f"{MAX_ENV_VALUE_BYTES} a value may have")
    if not problems and (total := env_bytes(env)) > MAX_ENV_BYTES:
        problems.append(f"env: {total} bytes is more than the {MAX_ENV_BYTES} an "
                        "env may have")
    return problems


def env_bytes(env: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) + 2 for k, v in env.items())


def planned_bytes(steps: list[PlannedStep]) -> int:
    """What a run's planned steps weigh in the store (their scripts and envs)."""
    return sum(len((s.run or "").encode()) + env_bytes(s.env) for s in steps)


def plan(spec: PipelineSpec, env_overrides: dict[str, str] | None = None,
         strict: bool = True) -> list[PlannedStep]:
    """Expand matrices and apply defaults; the result is in file order, variants in order.

    Submission-time `env_overrides` win over the pipeline's and the steps' env: they are what
    the person submitting asked for explicitly. A concurrency group naming a variable the env
    does not set is a SpecError (unless not `strict`).
    """
    variants_of = {s.name: [full for full, _ in _variants(s)] for s in spec.steps}
    planned: list[PlannedStep] = []
    d = spec.defaults
    for step in spec.steps:
        needs: list[str] = []
        for need in step.needs:
            for full in variants_of.get(need, [need]):
                if full not in needs:
                    needs.append(full)
        resources = step.resources or d.resources
        retry = step.retry or d.retry
        for full, values in _variants(step):
            env = {**spec.env, **step.env, **(env_overrides or {})}
            env.update({f"MATRIX_{k.upper()}": v for k, v in values.items()})
            group = expanded(step.concurrency, env, f"steps[{step.name}].concurrency.group",
                             strict)
            planned.append(PlannedStep(
                name=full, base=step.name, index=len(planned), run=step.run, needs=needs,
                matrix=values, env=env, pool=step.pool or d.pool, cpu=resources.cpu,
                memory_mb=resources.memory_mb, timeout_s=step.timeout or d.timeout,
                retry_max=retry.max, retry_on=list(retry.on), retry_infra=retry.infra,
                priority=step.priority, interruptible=bool(step.interruptible),
                artifacts=step.artifacts, cache=step.cache, reuse=step.reuse,
                condition=step.if_ or "", concurrency=group, approval=step.approval,
                let_finish=step.interruptible is False, secrets=step.secrets,
            ))
    return planned
