"""`explain`: why a step ran instead of being reused, part by part of its key
(cicd_ray.scheduler.reuse),
against the last success of the same step of the same pipeline of the same project before
its run (another project's runs are never read). It looks back over at most LOOKBACK_RUNS
runs: each costs a read of its steps.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from cicd_ray.errors import NotFound
from cicd_ray.protocol import Missing
from cicd_ray.records import Origin, RunRecord, StepRecord
from cicd_ray.scheduler.reuse import PARTS, source_of
from cicd_ray.states import StepState
from cicd_ray.store.base import Store

LOOKBACK_RUNS = 50  # how far back the last success is looked for
PAGE = 50


class Change(BaseModel):
    part: str  # one of keys.PARTS
    detail: str


class Explanation(BaseModel):
    run_id: str
    step: str
    state: str
    reuse: bool  # the step has `reuse: true`
    key: str = ""
    reused_from: Origin | None = None
    compared_with: Origin | None = None  # the last success it is compared with
    changed: list[Change] = Field(default_factory=list)
    summary: str


def explain(store: Store, run_id: str, name: str) -> Explanation:
    """Raises NotFound for an unknown run or step."""
    run = store.get_run(run_id)
    if run is None:
        raise NotFound(f"run {run_id!r} not found")
    steps = {s.name: s for s in store.get_steps(run_id)}
    step = steps.get(name)
    if step is None:
        raise NotFound(f"run {run_id} has no step {name!r}; its steps are: {', '.join(steps)}")
    out = Explanation(
        run_id=run_id,
        step=name,
        state=step.state.value,
        reuse=step.spec.reuse,
        key=step.key,
        reused_from=step.reused_from,
        summary="",
    )
    if step.reused_from is not None:
        o = step.reused_from
        out.summary = (
            f"not run: reused the success of run {o.run_id} (step {o.step}, attempt "
            f"{o.attempt}), which had the same key"
        )
        return out
    if not step.key_parts:
        out.summary = "it has not become ready yet, so it has no key to compare"
        return out
    earlier = _last_success(store, run, name)
    if earlier is None:
        out.summary = (
            f"no earlier success of step {name} in pipeline {run.pipeline} to "
            "compare with" + _reuse_note(step)
        )
        return out
    before_run, before = earlier
    out.compared_with = Origin(run_id=before_run.id, step=name, attempt=before.attempts)
    out.changed = _changes(store, run, step, steps, before_run, before)
    if out.changed:
        parts = ", ".join(c.part for c in out.changed)
        out.summary = (
            f"its key differs from run {before_run.id}'s success in: {parts}" + _reuse_note(step)
        )
    else:
        out.summary = (
            f"its key is the same as run {before_run.id}'s success, but no stored "
            "result had it: reuse was off for that step, or its result was deleted "
            "with its run"
            if step.spec.reuse
            else f"its key is the same as run {before_run.id}'s success: "
            "`reuse: true` would have reused it"
        )
    return out


def _reuse_note(step: StepRecord) -> str:
    return "" if step.spec.reuse else "; reuse is off for this step (`reuse: true` turns it on)"


def _last_success(store: Store, run: RunRecord, name: str) -> tuple[RunRecord, StepRecord] | None:
    for offset in range(0, LOOKBACK_RUNS, PAGE):
        page = store.list_runs(None, run.pipeline, PAGE, offset, project=run.project)
        for other in page:
            if other.seq >= run.seq:
                continue
            found = next((s for s in store.get_steps(other.id) if s.name == name), None)
            if found is not None and found.state is StepState.SUCCEEDED and found.key_parts:
                return other, found
        if len(page) < PAGE:
            return None
    return None


def _changes(
    store: Store,
    run: RunRecord,
    step: StepRecord,
    steps: dict[str, StepRecord],
    before_run: RunRecord,
    before: StepRecord,
) -> list[Change]:
    now_spec, then_spec = step.spec, before.spec
    details = {
        "script": lambda: _first_difference(then_spec.run, now_spec.run),
        "env": lambda: _dict_difference(then_spec.env, now_spec.env, "variable"),
        "matrix": lambda: _dict_difference(then_spec.matrix, now_spec.matrix, "value"),
        "pool": lambda: f"pool {then_spec.pool} -> {now_spec.pool}",
        "project": lambda: f"project {before_run.project} -> {run.project}",
        "secrets": lambda: f"secrets {sorted(then_spec.secrets)} -> {sorted(now_spec.secrets)}",
        "source": lambda: f"{source_of(before_run)} -> {source_of(run)}",
        "inputs": lambda: _input_difference(
            {s.name: s for s in store.get_steps(before_run.id)}, steps, now_spec.needs
        ),
        "outputs": lambda: f"artifacts {then_spec.artifacts} -> {now_spec.artifacts}",
    }
    return [
        Change(part=part, detail=details[part]())
        for part in PARTS
        if step.key_parts.get(part) != before.key_parts.get(part)
    ]


def _first_difference(old: str, new: str) -> str:
    a, b = old.splitlines(), new.splitlines()
    for i in range(max(len(a), len(b))):
        then = a[i] if i < len(a) else "(none)"
        now = b[i] if i < len(b) else "(none)"
        if then != now:
            return f"line {i + 1}: {then[:120]!r} -> {now[:120]!r}"
    return "whitespace at the end changed"


def _dict_difference(old: dict[str, str], new: dict[str, str], what: str) -> str:
    """Names only: a variable's value may be a secret."""
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    said = [
        f"{label} {', '.join(names)}"
        for label, names in (("changed", changed), ("added", added), ("removed", removed))
        if names
    ]
    return f"{what}s " + "; ".join(said) if said else f"{what}s changed"


def _input_difference(
    old_steps: dict[str, StepRecord], new_steps: dict[str, StepRecord], needs: list[str]
) -> str:
    said = []
    for need in needs:
        old = {f.path: f.digest for f in getattr(old_steps.get(need), "artifacts", [])}
        new = {f.path: f.digest for f in getattr(new_steps.get(need), "artifacts", [])}
        changed = sorted(p for p in set(old) & set(new) if old[p] != new[p])
        added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        for label, paths in (("changed", changed), ("added", added), ("removed", removed)):
            if paths:
                said.append(f"{need}'s {', '.join(paths[:5])} {label}")
    return "; ".join(said) or "the artifacts received changed"


def explain_answer(store: Store, run_id: str, name: str) -> Explanation | Missing:
    """`explain` for a caller across a process boundary: Missing instead of NotFound."""
    try:
        return explain(store, run_id, name)
    except NotFound as e:
        return Missing(detail=str(e))
