"""Secrets: read from their source when a step needs them, handed to the step apart from its
`env`, and masked in its log before a byte leaves the worker.

A project's secrets are files, `CICD_RAY_SECRETS_DIR/<project>/<NAME>` (the shape of a mounted
Kubernetes Secret), read at each attempt's start, so a changed file takes effect without a
restart. Only names travel through the master, the store and the views; values are read by the
worker that runs the step, and only for the secrets the step lists.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from urllib.parse import quote, quote_plus

from cicd_ray.errors import CicdError
from cicd_ray.pipeline.model import ENV_NAME, RESERVED_ENV_PREFIX

MIN_SECRET_CHARS = 6  # masking a shorter value would mask ordinary text
MASK = b"***"


class SecretError(CicdError):
    """A secret a step lists cannot be given to it."""


MAX_RUN_SECRETS = 32
MAX_SECRET_BYTES = 64 * 1024


def run_secret_problems(values: dict[str, str]) -> list[str]:
    """Problems with a submission's own secrets (never quoting a value)."""
    if len(values) > MAX_RUN_SECRETS:
        return [f"secrets: {len(values)} given, at most {MAX_RUN_SECRETS}"]
    problems = []
    for name, value in values.items():
        if not re.match(ENV_NAME, name) or name.startswith(RESERVED_ENV_PREFIX):
            problems.append(
                f"secrets.{name[:64]}: not a variable name (letters, digits, _; "
                "not starting with CICD_)"
            )
        elif not isinstance(value, str) or len(value) < MIN_SECRET_CHARS:
            problems.append(
                f"secrets.{name}: shorter than {MIN_SECRET_CHARS} characters: "
                "masking it in logs would mask ordinary text"
            )
        elif len(value.encode()) > MAX_SECRET_BYTES:
            problems.append(f"secrets.{name}: larger than {MAX_SECRET_BYTES} bytes")
    return problems


def secret_path(root: Path, project: str, name: str) -> Path:
    return root / project / name


def missing(root: Path | None, project: str, names: list[str]) -> list[str]:
    """Why each of `names` cannot be given (checked at submission): none configured, no such
    file, or a value too short to mask."""
    out = []
    for name in names:
        try:
            read(root, project, name)
        except SecretError as e:
            out.append(str(e))
    return out


def read(root: Path | None, project: str, name: str) -> str:
    """A secret's value (one trailing newline dropped, as `echo` writes one)."""
    if root is None:
        raise SecretError(f"{name}: no secrets are configured here (set CICD_RAY_SECRETS_DIR)")
    path = secret_path(root, project, name)
    try:
        value = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise SecretError(
            f"{name}: project {project} has no such secret (a file "
            f"{name} in CICD_RAY_SECRETS_DIR/{project})"
        ) from None
    value = value[:-1] if value.endswith("\n") else value
    if len(value) < MIN_SECRET_CHARS:
        raise SecretError(
            f"{name}: shorter than {MIN_SECRET_CHARS} characters: masking it "
            "in logs would mask ordinary text"
        )
    return value


def read_all(root: Path | None, project: str, names: list[str]) -> dict[str, str]:
    return {name: read(root, project, name) for name in names}


# base64 characters of (k prefix bytes + value) that the prefix touches, for k = 0, 1, 2
PREFIX_CHARS = (0, 2, 3)


def forms(value: str) -> set[bytes]:
    """What is masked of a value: the value, each of its lines long enough to mask, its
    URL-encoded and JSON-escaped forms, and its base64 forms (standard and URL-safe) wherever
    it starts in what is encoded: at a multiple of 3 bytes, or 1 or 2 after (an HTTP Basic
    `user:secret`, a secret inside a larger encoded blob); each cut to the characters the
    value alone decides."""
    raw = value.encode()
    out = {
        raw,
        quote(value, safe="").encode(),
        quote_plus(value).encode(),
        json.dumps(value)[1:-1].encode(),
        json.dumps(value, ensure_ascii=False)[1:-1].encode(),
    }
    out |= {line.encode() for line in value.splitlines() if len(line) >= MIN_SECRET_CHARS}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encode(raw)
        out |= {encoded, encoded.rstrip(b"=")}
        for k, lead in enumerate(PREFIX_CHARS):
            whole = encode(b"\0" * k + raw)[: 4 * ((k + len(raw)) // 3)][lead:]
            if len(whole) >= MIN_SECRET_CHARS:
                out.add(whole)
    return {f for f in out if f}


class Masker:
    """Masks secrets in a stream of chunks. What may be the start of a secret split across two
    chunks (the end of a chunk that begins one of its forms) is held back until the next chunk
    (or the end) shows it; everything else goes on at once, so a live log does not lag."""

    def __init__(self, values: list[str]) -> None:
        self._patterns = sorted({f for v in values for f in forms(v)}, key=len, reverse=True)
        self._re = re.compile(b"|".join(map(re.escape, self._patterns))) if self._patterns else None
        self._longest = max(map(len, self._patterns), default=0)
        self._buf = b""

    def feed(self, data: bytes) -> bytes:
        if self._re is None:
            return data
        buf = self._buf + data
        out, at, cut = [], 0, len(buf)
        for m in self._re.finditer(buf):
            if self._could_grow(buf[m.start() :]):
                cut = m.start()  # a longer form may match with what comes next
                break
            out += [buf[at : m.start()], MASK]
            at = m.end()
        else:
            cut = len(buf) - self._started(buf[at:])
        out.append(buf[at:cut])
        self._buf = buf[cut:]
        return b"".join(out)

    def _could_grow(self, tail: bytes) -> bool:
        return any(len(p) > len(tail) and p.startswith(tail) for p in self._patterns)

    def _started(self, rest: bytes) -> int:
        """How many of the last bytes of `rest` begin a form (and may end in the next chunk)."""
        for k in range(min(len(rest), self._longest - 1), 0, -1):
            if any(p.startswith(rest[-k:]) for p in self._patterns):
                return k
        return 0

    def text(self, text: str) -> str:
        """A whole text (a reason, a file's name) with every form masked."""
        if self._re is None:
            return text
        return self._re.sub(MASK, text.encode()).decode(errors="replace")

    def flush(self) -> bytes:
        if self._re is None:
            return b""
        rest, self._buf = self._buf, b""
        return self._re.sub(MASK, rest)
