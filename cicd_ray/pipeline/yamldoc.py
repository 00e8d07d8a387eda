"""YAML as people write it, read safely: YAML 1.2 core-schema scalars, bounded documents.

PyYAML reads YAML 1.1, where `on`, `off`, `yes`, `no`, `y` and `n` are booleans, `010` is
octal, `1:20` is a number and `2026-11-28` a date. A CI file is written for YAML 1.2 (GitHub
Actions' `on:` is a key, not `True`), so this loader resolves plain scalars by the 1.2 core
schema only: `true`/`false` are the booleans, `null`/`~`/empty is null, decimal, `0o` and `0x`
integers and decimal floats are numbers, and everything else is a string. A number keeps the
text it was written as (`yaml_text`), so a matrix value `3.10` stays "3.10", not 3.1.

Every document is first walked as a stream of events (libyaml's C parser, no recursion):
anchors and aliases are refused (a few hundred bytes of nested aliases expand to gigabytes),
and so are documents nested too deep or with too many values, before anything is built.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from cicd_ray.errors import SpecError, brief

M = TypeVar("M", bound=BaseModel)

MAX_DEPTH = 32  # mappings and lists inside each other; a pipeline needs about 6
MAX_NODES = 200_000  # scalars, mappings and lists in one document

_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

BOOL = "tag:yaml.org,2002:bool"
INT = "tag:yaml.org,2002:int"
FLOAT = "tag:yaml.org,2002:float"
NULL = "tag:yaml.org,2002:null"


class YamlInt(int):
    """An integer that remembers how it was written."""

    yaml_text: str


class YamlFloat(float):
    """A float that remembers how it was written (`3.10` is not `3.1` in a matrix)."""

    yaml_text: str


class CoreLoader(_Base):
    """libyaml's safe loader with the YAML 1.2 core schema's implicit types, nothing more."""

    yaml_implicit_resolvers: ClassVar[dict] = {}


_CORE = [
    (NULL, r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    (BOOL, r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    (INT, r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        FLOAT,
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+.0123456789"),
    ),
]
for _tag, _pattern, _first in _CORE:
    CoreLoader.add_implicit_resolver(_tag, re.compile(_pattern), _first)


def _construct_int(loader: CoreLoader, node: yaml.ScalarNode) -> YamlInt:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        value = YamlInt(int(text[2:], 8))
    elif text.startswith("0x"):
        value = YamlInt(int(text[2:], 16))
    else:
        value = YamlInt(int(text, 10))
    value.yaml_text = text
    return value


def _construct_float(loader: CoreLoader, node: yaml.ScalarNode) -> YamlFloat:
    text = loader.construct_scalar(node)
    special = {".inf": "inf", "+.inf": "inf", "-.inf": "-inf", ".nan": "nan"}
    value = YamlFloat(float(special.get(text.lower(), text)))
    value.yaml_text = text
    return value


def _construct_bool(loader: CoreLoader, node: yaml.ScalarNode) -> bool:
    return loader.construct_scalar(node).lower() == "true"


CoreLoader.add_constructor(INT, _construct_int)
CoreLoader.add_constructor(FLOAT, _construct_float)
CoreLoader.add_constructor(BOOL, _construct_bool)


def load(text: str, source: str = "pipeline", max_bytes: int | None = None) -> Any:
    """Parse one YAML document; SpecError (naming the limit or the YAML error) if it cannot be."""
    if max_bytes is not None:
        size = len(text.encode("utf-8", errors="replace"))
        if size > max_bytes:
            raise SpecError(
                [
                    f"(document): {size} bytes is more than the {max_bytes} byte "
                    "limit for a pipeline (CICD_RAY_MAX_PIPELINE_BYTES)"
                ],
                source=source,
            )
    try:
        _check_events(text, source)
        return yaml.load(text, Loader=CoreLoader)
    except yaml.YAMLError as e:
        raise SpecError([f"not valid YAML: {brief(str(e), 400)}"], source=source) from None


def _check_events(text: str, source: str) -> None:
    depth = nodes = 0
    for event in yaml.parse(text, Loader=_Base):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise SpecError(
                [
                    f"{_where(event)}: YAML anchors and aliases (&name, *name) are "
                    "not allowed in a pipeline; write the value out"
                ],
                source=source,
            )
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_NODES:
                raise SpecError(
                    [f"{_where(event)}: more than {MAX_NODES} values in one document"],
                    source=source,
                )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(
                    [f"{_where(event)}: nested more than {MAX_DEPTH} levels deep"], source=source
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def check_shape(value: Any, source: str = "pipeline") -> None:
    """The same depth and size limits for a document that arrived already parsed (JSON)."""
    stack = [(value, 1)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise SpecError([f"(document): more than {MAX_NODES} values"], source=source)
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise SpecError(
                    [f"(document): nested more than {MAX_DEPTH} levels deep"], source=source
                )
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _where(event: yaml.Event) -> str:
    mark = event.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(document)"


def load_list(path: str | Path, key: str, model: type[M], required: bool = True) -> list[M]:
    """The items of a settings file's list `key` (pools, projects, repositories, schedules),
    each validated by `model`; with `required` off, no `key` is an empty list. SpecError
    names the file and what is wrong."""
    try:
        doc = load(Path(path).read_text(encoding="utf-8"), source=str(path)) or {}
        items = doc.get(key, None if required else []) if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise SpecError([f"{key}: expected a list of {key}"], source=str(path))
        return [model.model_validate(item) for item in items]
    except (OSError, ValidationError) as e:
        raise SpecError([f"{key}: {e}"], source=str(path)) from None
