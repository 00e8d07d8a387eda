"""API tokens: where they come from and how a presented one is checked.

Only SHA-256 digests are kept in memory and handed to replicas; a presented token is hashed
and compared with each digest in constant time. Tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path

from cicd_ray.errors import CicdError

HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# Set by `cicd-ray up` for its replicas: digests only, never the tokens themselves.
DIGESTS_ENV = "CICD_RAY_TOKEN_DIGESTS"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "cicd_" + secrets.token_urlsafe(32)


def configured_digests(env: dict[str, str]) -> list[str]:
    """Digests from CICD_RAY_TOKENS (tokens, comma-separated), CICD_RAY_TOKENS_FILE (one hex
    digest a line; blank lines and # comments skipped) and CICD_RAY_TOKEN_DIGESTS, in the
    variables `env` gives (Settings.from_env reads them)."""
    out = [digest(t.strip()) for t in env.get("CICD_RAY_TOKENS", "").split(",") if t.strip()]
    out += [d for d in env.get(DIGESTS_ENV, "").split(",") if d]
    path = env.get("CICD_RAY_TOKENS_FILE")
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise CicdError(f"CICD_RAY_TOKENS_FILE={path}: cannot read it ({e.strerror})") from None
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not HEX_DIGEST.match(line):
                raise CicdError(f"CICD_RAY_TOKENS_FILE={path} line {n}: expected a SHA-256 hex "
                                "digest (64 characters 0-9a-f), e.g. from `sha256sum`")
            out.append(line)
    for d in out:
        if not HEX_DIGEST.match(d):
            raise CicdError(f"{DIGESTS_ENV}: {d[:8]}... is not a SHA-256 hex digest")
    return out


def check(presented: str | None, digests: list[str]) -> bool:
    """True when `presented` matches a configured token. Every digest is compared."""
    if not presented or not digests:
        return False
    candidate = digest(presented)
    matched = False
    for d in digests:
        matched |= hmac.compare_digest(candidate, d)
    return matched
