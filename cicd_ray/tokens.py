"""API tokens: where they come from, what each may do, and how a presented one is checked.

A token grants a role in a project: `read` (see runs, logs, artifacts), `submit` (also start,
cancel, re-run and approve), `admin` (every project, and the audit). Only SHA-256 digests are
kept and handed to replicas; a presented token is hashed and compared with every digest in
constant time. Tokens are never logged.

A tokens file (CICD_RAY_TOKENS_FILE) holds a grant a line: `<digest> role=<role>
project=<project>`; a bare digest is an admin token (what files written before projects
existed meant), a digest with a project and no role a `read` token of it (never more than
the line says). Tokens in CICD_RAY_TOKENS are admin tokens of the `default` project.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from cicd_ray.errors import CicdError
from cicd_ray.ownership import private_folder

log = logging.getLogger(__name__)
HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DEFAULT_PROJECT = "default"
# Set by `cicd-ray up` for its replicas: grants (digests only, never the tokens themselves).
DIGESTS_ENV = "CICD_RAY_TOKEN_DIGESTS"


class Role(str, Enum):
    READ = "read"
    SUBMIT = "submit"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(needed)


class Grant(BaseModel):
    """What one token may do."""

    model_config = ConfigDict(frozen=True)
    digest: str
    role: Role = Role.ADMIN
    project: str = DEFAULT_PROJECT

    @property
    def token_id(self) -> str:
        """Names the token in audit records (a digest's start: it tells nothing of the token)."""
        return self.digest[:12]

    def sees(self, project: str) -> bool:
        return self.role is Role.ADMIN or project == self.project

    @property
    def line(self) -> str:
        if self.role is Role.ADMIN:
            return f"{self.digest} role=admin"
        return f"{self.digest} role={self.role.value} project={self.project}"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "cicd_" + secrets.token_urlsafe(32)


def parse_grant(text: str) -> Grant:
    """A grant from its line: `<digest> [role=<role>] [project=<project>]`. ValueError says
    what is wrong."""
    first, *fields = text.split()
    if not HEX_DIGEST.match(first):
        raise ValueError(
            "expected a SHA-256 hex digest (64 characters 0-9a-f), e.g. from "
            "`sha256sum`, then role=<read|submit|admin> and project=<name>"
        )
    values: dict[str, str] = {}
    for field in fields:
        name, sep, value = field.partition("=")
        if not sep or name not in ("role", "project") or name in values:
            raise ValueError(
                f"{field!r}: expected role=<read|submit|admin> or project=<name>, each at most once"
            )
        values[name] = value
    # No role: a bare digest is an admin's (files from before projects); one that names a
    # project reads it, and no more.
    role = values.get("role", Role.READ.value if "project" in values else Role.ADMIN.value)
    if role not in {r.value for r in Role}:
        raise ValueError(f"role={role}: the roles are read, submit and admin")
    project = values.get("project", DEFAULT_PROJECT)
    if not PROJECT_NAME.match(project):
        raise ValueError(
            f"project={project}: a project's name is lowercase letters, digits, "
            "'.', '_' and '-' (at most 63)"
        )
    if role != Role.ADMIN.value and "project" not in values:
        raise ValueError(f"role={role} needs a project=<name>")  # (role= was given)
    return Grant(digest=first, role=Role(role), project=project)


def read_tokens_file(path: Path) -> list[Grant]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise CicdError(f"CICD_RAY_TOKENS_FILE={path}: cannot read it ({e.strerror})") from None
    out = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                out.append(parse_grant(line))
            except ValueError as e:
                raise CicdError(f"CICD_RAY_TOKENS_FILE={path} line {n}: {e}") from None
    return out


def env_grants(env: dict[str, str]) -> list[Grant]:
    """The grants given in variables: CICD_RAY_TOKENS (admin tokens, comma-separated) and
    CICD_RAY_TOKEN_DIGESTS (grant lines, comma-separated)."""
    out = [
        Grant(digest=digest(t.strip()))
        for t in env.get("CICD_RAY_TOKENS", "").split(",")
        if t.strip()
    ]
    for item in env.get(DIGESTS_ENV, "").split(","):
        if item.strip():
            try:
                out.append(parse_grant(item))
            except ValueError as e:
                raise CicdError(f"{DIGESTS_ENV}: {item.strip()[:8]}...: {e}") from None
    return out


def match(presented: str | None, grants: list[Grant]) -> Grant | None:
    """The grant of the presented token, or None. Every digest is compared."""
    if not presented or not grants:
        return None
    candidate = digest(presented)
    found = None
    for g in grants:
        if hmac.compare_digest(candidate, g.digest):
            found = found or g
    return found


class TokenBook:
    """The grants an API replica checks: fixed ones, and a tokens file read again when it
    changes (a token `cicd-ray token create` adds works without a restart; removing a line
    revokes it). A file that disappears, becomes unreadable or malformed grants nothing until
    it is fixed, and says so in the log: a revocation by deleting or breaking the file must
    not leave the old grants in force."""

    def __init__(self, fixed: list[Grant], path: Path | None = None) -> None:
        self.fixed = fixed
        self.path = path
        self._seen: tuple[int, int] | None = None
        self._from_file: list[Grant] = []
        self._lock = threading.Lock()

    def grants(self) -> list[Grant]:
        if self.path is not None:
            self._reload()
        return self.fixed + self._from_file

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
            seen: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            seen = None
        if seen == self._seen:
            return
        with self._lock:
            self._seen = seen
            try:
                self._from_file = read_tokens_file(self.path) if seen else []
                if seen is None:
                    log.info("tokens file %s is not there: it grants nothing", self.path)
            except CicdError as e:
                self._from_file = []
                log.error("%s: every token of the file is refused until it is fixed", e)


def add_token(path: Path, role: Role, project: str | None) -> tuple[str, Grant]:
    """A new token granted `role` in `project`, its line appended to the tokens file (created
    0600). Returns the token (to be shown once) and its grant."""
    if role is not Role.ADMIN and not project:
        raise CicdError(f"--role {role.value} needs --project")
    if project and not PROJECT_NAME.match(project):
        raise CicdError(
            f"--project {project}: a project's name is lowercase letters, digits, "
            "'.', '_' and '-' (at most 63)"
        )
    token = new_token()
    grant = Grant(digest=digest(token), role=role, project=project or DEFAULT_PROJECT)
    private_folder(path.parent)  # (CICD_RAY_HOME, when it is made here first)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        if f.tell() == 0:
            f.write("# cicd-ray API tokens: <sha256 of the token> role=<role> project=<name>\n")
        f.write(grant.line + "\n")
    return token, grant
