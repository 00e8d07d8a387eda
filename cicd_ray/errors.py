"""The project's exceptions: one root, so callers can catch everything cicd-ray raises."""

from __future__ import annotations


class CicdError(Exception):
    """Root of every error cicd-ray raises on purpose."""


class SpecError(CicdError):
    """A pipeline file is malformed. `problems` lists each one as 'field.path: message'."""

    def __init__(self, problems: list[str], source: str = "pipeline") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} is invalid ({len(self.problems)} problem(s)):\n{lines}")


class NotFound(CicdError):
    """A run, step, attempt or worker that does not exist."""


class InvalidTransition(CicdError):
    """A state change the state machine does not allow (for example out of a terminal state)."""


class StoreError(CicdError):
    """The durable store could not be read or written."""


class MasterUnavailable(CicdError):
    """The master actor cannot be reached."""


class Unauthorized(CicdError):
    """The API refused the token (HTTP 401)."""


class ApiError(CicdError):
    """Any other error answer from the HTTP API; `status` is the HTTP status."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {detail}")
