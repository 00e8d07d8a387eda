"""The retry rule, a pure function: after an attempt ends, is the step tried again?

Two budgets. A lost worker or node (`infra`) is the platform's fault, not the step's: such an
attempt is retried automatically, `retry.infra` times (default 2), as a CI agent that vanished
is replaced. Past that, and for the step's own failures and timeouts, `retry.max` counts the
retries of the causes `retry.on` lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Cause = Literal["infra", "failure", "timeout"]


class RetryPolicy(Protocol):
    """A step's retry settings (a PlannedStep has them)."""

    retry_max: int
    retry_on: Sequence[Cause]
    retry_infra: int


@dataclass(frozen=True)
class Verdict:
    retry: bool
    automatic: bool = False  # from the infra budget, not from retry.max
    why: str = ""  # for the step's reason: "failure", "infra, retried automatically (1 of 2)"


def verdict(spec: RetryPolicy, cause: Cause, attempts: int, infra_used: int) -> Verdict:
    """`attempts` made so far (the one that just ended included), `infra_used` of them already
    retried from the infra budget."""
    if cause == "infra" and infra_used < spec.retry_infra:
        return Verdict(
            retry=True,
            automatic=True,
            why=f"{cause}, retried automatically ({infra_used + 1} of {spec.retry_infra})",
        )
    return Verdict(
        retry=cause in spec.retry_on and attempts - infra_used <= spec.retry_max, why=cause
    )
