"""The retry rule, a pure function: after an attempt ends, is the step tried again?

Two budgets. A lost worker or node (`infra`) is the platform's fault, not the step's: such an
attempt is retried automatically, `retry.infra` times (default 2), as a CI agent that vanished
is replaced. Past that, and for the step's own failures and timeouts, `retry.max` counts the
retries of the causes `retry.on` lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Cause = Literal["infra", "failure", "timeout"]
DEFAULT_INFRA_RETRIES = 2


@dataclass(frozen=True)
class Verdict:
    retry: bool
    automatic: bool = False  # from the infra budget, not from retry.max

    def describe(self, cause: Cause, infra_used: int, infra_budget: int) -> str:
        if self.automatic:
            return f"{cause}, retried automatically ({infra_used + 1} of {infra_budget})"
        return cause


def verdict(cause: Cause, attempts: int, infra_used: int, retry_max: int,
            retry_on: list[Cause] | tuple[Cause, ...], infra_budget: int) -> Verdict:
    """`attempts` made so far (the one that just ended included), `infra_used` of them already
    retried from the infra budget."""
    if cause == "infra" and infra_used < infra_budget:
        return Verdict(retry=True, automatic=True)
    return Verdict(retry=cause in retry_on and attempts - infra_used <= retry_max)
