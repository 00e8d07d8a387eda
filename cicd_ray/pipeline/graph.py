"""A pipeline as a graph: DAG checks (unknown needs, cycles, sizes), matrix expansion, and
`plan()`, which turns a checked spec into the concrete steps the scheduler runs.
"""

from __future__ import annotations

import itertools
import re

from cicd_ray.errors import SpecError, brief, quote
from cicd_ray.pipeline.model import (
    ENV_NAME,
    MAX_ENV_BYTES,
    MAX_ENV_VALUE_BYTES,
    MAX_MATRIX_VARIANTS,
    MAX_NEED_EDGES,
    MAX_PLANNED_STEPS,
    RESERVED_ENV_PREFIX,
    ConcurrencySpec,
    PipelineSpec,
    PlannedStep,
    StepSpec,
)


def check_graph(spec: PipelineSpec) -> list[str]:
    """Problems that span steps: duplicates, unknown needs, reserved env, sizes, cycles.

    Sizes are counted before anything is expanded: a few lines of matrix can name millions of
    variants, and a run's needs grow with the product of its matrices.
    """
    counts = {step.name: _variant_count(step) for step in spec.steps}
    problems = (
        _duplicates(spec)
        + _reserved_env(spec)
        + _env_sizes(spec)
        + _matrix_sizes(spec, counts)
        + _controls(spec)
    )
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
            problems.append(
                f"steps[{i}] ({step.name}).name: duplicate step name, "
                f"already used by steps[{seen[step.name]}]"
            )
        seen.setdefault(step.name, i)
    return problems


def _env_sizes(spec: PipelineSpec) -> list[str]:
    problems = []
    for i, step in enumerate(spec.steps):
        size = env_bytes({**spec.env, **step.env})
        if size > MAX_ENV_BYTES:
            problems.append(
                f"steps[{i}] ({step.name}).env: with the pipeline's env, {size} "
                f"bytes is more than the {MAX_ENV_BYTES} a step's env may have"
            )
    return problems


def _reserved_env(spec: PipelineSpec) -> list[str]:
    places = [("env", spec.env)] + [
        (f"steps[{i}] ({s.name}).env", s.env) for i, s in enumerate(spec.steps)
    ]
    return [
        f"{where}.{key}: names starting with {RESERVED_ENV_PREFIX} are reserved for "
        "cicd-ray; rename it"
        for where, env in places
        for key in env
        if key.startswith(RESERVED_ENV_PREFIX)
    ]


def _controls(spec: PipelineSpec) -> list[str]:
    """Per step: something to do, a condition over its own matrix keys, group names that
    expand."""
    from cicd_ray.pipeline.conditions import ConditionError, parse

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
        problems += [
            f"{where}.secrets: {name} is also in env; a secret must not be"
            for name in step.secrets
            if name in {**spec.env, **step.env}
        ]
        problems += [
            f"{where}.secrets: {name}: names starting with {RESERVED_ENV_PREFIX} "
            "are reserved for cicd-ray"
            for name in step.secrets
            if name.startswith(RESERVED_ENV_PREFIX)
        ]
    for where, concurrency in groups:
        if concurrency is not None:
            problems += [f"{where}: {p}" for p in _template_problems(concurrency.group)]
    return problems


_VARIABLE = re.compile(r"\$\{([^}]*)\}")


def _template_problems(template: str) -> list[str]:
    rest = _VARIABLE.sub("", template)
    problems = [
        f"${{{name}}} is not a variable name"
        for name in _VARIABLE.findall(template)
        if not re.match(ENV_NAME, name)
    ]
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
        raise SpecError(
            [
                f"{where}: ${{{missing[0]}}} is not set in the run's env; set it in "
                "the pipeline's env or when submitting"
            ]
        )
    return _VARIABLE.sub(lambda m: env[m.group(1)], template)


def expanded(
    concurrency: ConcurrencySpec | None, env: dict[str, str], where: str, strict: bool = True
) -> ConcurrencySpec | None:
    if concurrency is None:
        return None
    return concurrency.model_copy(update={"group": expand(concurrency.group, env, where, strict)})


def _matrix_sizes(spec: PipelineSpec, counts: dict[str, int]) -> list[str]:
    return [
        f"steps[{i}] ({step.name}).matrix: expands to {counts[step.name]} variants, more "
        f"than the {MAX_MATRIX_VARIANTS} allowed"
        for i, step in enumerate(spec.steps)
        if counts[step.name] > MAX_MATRIX_VARIANTS
    ]


def _unknown_needs(spec: PipelineSpec) -> list[str]:
    names = {step.name for step in spec.steps}
    variants = {full for step in spec.steps for full, _ in _variants(step)}
    known = ", ".join(sorted(names)) or "(none)"
    return [
        f"steps[{i}] ({step.name}).needs[{j}]: unknown step {quote(need)}; known steps "
        f"are: {brief(known)}"
        for i, step in enumerate(spec.steps)
        for j, need in enumerate(step.needs)
        if need not in names and need not in variants
    ]


def _variant_count(step: StepSpec) -> int:
    count = 1
    for values in step.matrix.values():
        count *= len(values)
    return count


def _check_sizes(spec: PipelineSpec, counts: dict[str, int]) -> list[str]:
    """The run's planned steps and need edges against their limits, counted, not built."""
    total = sum(counts.values())
    if total > MAX_PLANNED_STEPS:
        return [
            f"steps: the run would have {total} steps once matrices are expanded, more "
            f"than the {MAX_PLANNED_STEPS} allowed"
        ]
    edges = sum(counts[s.name] * sum(counts.get(n, 1) for n in set(s.needs)) for s in spec.steps)
    if edges > MAX_NEED_EDGES:
        return [
            f"steps: the needs would link {edges} pairs of steps once matrices are "
            f"expanded, more than the {MAX_NEED_EDGES} allowed; need fewer variants"
        ]
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
                return [*path[path.index(nxt) :], nxt]
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
            problems.append(
                f"env.{key}: {size} bytes is more than the {MAX_ENV_VALUE_BYTES} a value may have"
            )
    if not problems and (total := env_bytes(env)) > MAX_ENV_BYTES:
        problems.append(f"env: {total} bytes is more than the {MAX_ENV_BYTES} an env may have")
    return problems


def env_bytes(env: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) + 2 for k, v in env.items())


def planned_bytes(steps: list[PlannedStep]) -> int:
    """What a run's planned steps weigh in the store (their scripts and envs)."""
    return sum(len((s.run or "").encode()) + env_bytes(s.env) for s in steps)


def plan(
    spec: PipelineSpec, env_overrides: dict[str, str] | None = None, strict: bool = True
) -> list[PlannedStep]:
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
            group = expanded(step.concurrency, env, f"steps[{step.name}].concurrency.group", strict)
            planned.append(
                PlannedStep(
                    name=full,
                    base=step.name,
                    index=len(planned),
                    run=step.run,
                    needs=needs,
                    matrix=values,
                    env=env,
                    pool=step.pool or d.pool,
                    cpu=resources.cpu,
                    memory_mb=resources.memory_mb,
                    timeout_s=step.timeout or d.timeout,
                    retry_max=retry.max,
                    retry_on=list(retry.on),
                    retry_infra=retry.infra,
                    priority=step.priority,
                    interruptible=bool(step.interruptible),
                    artifacts=step.artifacts,
                    cache=step.cache,
                    reuse=step.reuse,
                    condition=step.if_ or "",
                    concurrency=group,
                    approval=step.approval,
                    let_finish=step.interruptible is False,
                    secrets=step.secrets,
                )
            )
    return planned
