"""Loading a pipeline: YAML text or an object, validated against the models, every problem
reported at once with its field path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)

from cicd_ray.errors import SpecError, brief, quote
from cicd_ray.pipeline import yamldoc
from cicd_ray.pipeline.graph import check_graph
from cicd_ray.pipeline.model import DEFAULT_MAX_PIPELINE_BYTES, PipelineSpec


def load_pipeline(path: str | Path, max_bytes: int = DEFAULT_MAX_PIPELINE_BYTES) -> PipelineSpec:
    """Read and validate a pipeline file; raise SpecError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([f"cannot read {p}: {e.strerror}"], source=str(p)) from None
    return parse_pipeline(text, source=str(p), max_bytes=max_bytes)


def load_yaml(
    text: str, source: str = "pipeline", max_bytes: int = DEFAULT_MAX_PIPELINE_BYTES
) -> Any:
    """YAML text as cicd-ray reads every pipeline: 1.2 core scalars, bounded (see yamldoc);
    `max_bytes` is the settings' `max_pipeline_bytes` (CICD_RAY_MAX_PIPELINE_BYTES)."""
    return yamldoc.load(text, source=source, max_bytes=max_bytes)


def parse_pipeline(
    doc: str | dict[str, Any],
    source: str = "pipeline",
    max_bytes: int = DEFAULT_MAX_PIPELINE_BYTES,
    measure_objects: bool = False,
) -> PipelineSpec:
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
                raise SpecError(
                    [
                        f"(document): {size} bytes as JSON is more than the "
                        f"{max_bytes} byte limit (CICD_RAY_MAX_PIPELINE_BYTES)"
                    ],
                    source=source,
                )
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
