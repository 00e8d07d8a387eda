"""The pure scheduling policy, no Ray and no clock (every method takes `now`).

`Scheduler` is a facade over parts with one reason to change each: the runs' DAG state
(`runbook`), the ready queues (`queues`), the workers and their slots (`slots`); the retry rule
(`retries`) and pool sizing (`sizing`) are pure functions it consults. What it decides is
collected in `Decisions` for the master to write, then carry out.
"""

from cicd_ray.scheduler.decisions import Decisions, Effects, Kill
from cicd_ray.scheduler.policy import Scheduler
from cicd_ray.scheduler.slots import check_fits

__all__ = ["Decisions", "Effects", "Kill", "Scheduler", "check_fits"]
