"""Cache key templates: text with `${{ ... }}` expressions, expanded on the worker once the
step's workspace holds its source.

    key: pip-${{ env.MATRIX_PY }}-${{ hashFiles('requirements.txt', '**/*.lock') }}

- `${{ hashFiles('GLOB', ...) }}`: the first 16 hex digits of a SHA-256 over the files the globs
  match in the workspace (paths and contents, in path order); no match gives the digest of
  nothing, so the key still expands.
- `${{ env.NAME }}`: the step's variable NAME (the pipeline's env, matrix values as MATRIX_*),
  empty when unset.

Checked when the pipeline is validated (`check_template`); no other expression is accepted.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from typing import BinaryIO

EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}")
HASH_FILES = re.compile(r"^hashFiles\(\s*('[^']+'(?:\s*,\s*'[^']+')*)\s*\)$")
ENV = re.compile(r"^env\.([A-Za-z_][A-Za-z0-9_]*)$")
KEY_TEXT = re.compile(r"^[A-Za-z0-9._+@:/=-]*$")
DIGEST_CHARS = 16


def check_template(text: str) -> str | None:
    """The problem with a key template, or None."""
    rest = EXPRESSION.sub("", text)
    if "${{" in rest or "}}" in rest:
        return f"{text!r}: an expression is not closed: write ${{{{ ... }}}}"
    if not KEY_TEXT.match(rest):
        return (
            f"{text!r}: outside ${{{{ }}}} a key may hold only letters, digits and . _ + @ : / = -"
        )
    for match in EXPRESSION.finditer(text):
        inner = match.group(1).strip()
        if not (HASH_FILES.match(inner) or ENV.match(inner)):
            return (
                f"{text!r}: unknown expression {inner!r}; a key may use "
                "hashFiles('GLOB', ...) and env.NAME"
            )
    return None


def expand(
    text: str,
    env: dict[str, str],
    files: Callable[[list[str]], Iterable[tuple[str, Callable[[], BinaryIO]]]],
) -> str:
    """The key `text` names for this step: `files(globs)` gives the (path, opener) pairs
    a hashFiles(...) covers."""

    def one(match: re.Match) -> str:
        inner = match.group(1).strip()
        named = ENV.match(inner)
        if named:
            return env.get(named.group(1), "")
        globs = re.findall(r"'([^']+)'", inner)
        digest = hashlib.sha256()
        for rel, opener in sorted(files(globs), key=lambda found: found[0]):
            digest.update(rel.encode() + b"\0")
            with opener() as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            digest.update(b"\0")
        return digest.hexdigest()[:DIGEST_CHARS]

    return EXPRESSION.sub(one, text)
