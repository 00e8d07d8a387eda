"""The project's exceptions: one root, so callers can catch everything cicd-ray raises."""

from __future__ import annotations

import reprlib

QUOTE_LIMIT = 200  # the most characters of a user's value an error message repeats
_quoter = reprlib.Repr()  # keyword arguments only from Python 3.12
_quoter.maxlevel, _quoter.maxdict, _quoter.maxlist = 3, 8, 8
_quoter.maxstring, _quoter.maxother, _quoter.maxlong = QUOTE_LIMIT, QUOTE_LIMIT, 60


def brief(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` cut to `limit` characters: an error never repeats a huge value whole."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def quote(value: object) -> str:
    """A short repr of a user's value for an error message, bounded whatever its size or depth."""
    return brief(_quoter.repr(value))


class CicdError(Exception):
    """Root of every error cicd-ray raises on purpose."""


class ProblemsError(CicdError):
    """Input with problems; `problems` lists each one as 'field.path: message'."""

    MAX_PROBLEMS = 50  # a hostile document can have millions; the first ones say enough

    def __init__(self, problems: list[str], source: str) -> None:
        self.problems = list(problems[: self.MAX_PROBLEMS])
        if len(problems) > self.MAX_PROBLEMS:
            self.problems.append(f"... and {len(problems) - self.MAX_PROBLEMS} more problem(s)")
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} is invalid ({len(self.problems)} problem(s)):\n{lines}")


class SpecError(ProblemsError):
    """A pipeline (or pools file) is malformed."""

    def __init__(self, problems: list[str], source: str = "pipeline") -> None:
        super().__init__(problems, source)


class SettingsError(ProblemsError):
    """A CICD_RAY_* variable is malformed; each problem names the variable."""

    def __init__(self, problems: list[str], source: str = "environment") -> None:
        super().__init__(problems, source)


class NotFound(CicdError):
    """A run, step, attempt or worker that does not exist."""


class InvalidTransition(CicdError):
    """A state change the state machine does not allow (for example out of a terminal state)."""


class SourceError(CicdError):
    """A source could not be fetched, packed or unpacked (a git ref, an archive's limits)."""


class IsolationError(CicdError):
    """A step's user could not be set up (a bad CICD_RAY_STEP_UIDS, no free user)."""


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
