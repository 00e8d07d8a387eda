"""Fair share between projects: which project's ready step a contended pool takes next, and
which projects are at their quota of running steps. Pure: the counts come in, a choice goes
out.

With fair share on, the project whose running steps weigh least (running / weight) goes next;
with it off, the best step of any project (priority, then the older run). Within a project
the order is always priority, then the older run, then pipeline order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cicd_ray.pools import ProjectConfig


@dataclass
class Share:
    projects: dict[str, ProjectConfig] = field(default_factory=dict)
    fair: bool = True
    running: Counter[str] = field(default_factory=Counter)  # running steps per project, now

    def weight(self, project: str) -> float:
        config = self.projects.get(project)
        return config.weight if config else 1.0

    def full(self, project: str) -> bool:
        """At its quota of running steps: none of its steps starts now."""
        config = self.projects.get(project)
        limit = config.max_running_steps if config else None
        return limit is not None and self.running[project] >= limit

    def pick(self, heads: dict[str, Any]) -> str | None:
        """The project whose step goes next, given each project's best ready step (`heads`:
        comparable, lower is better); None when every one is at its quota."""
        open_ = [p for p in heads if not self.full(p)]
        if not open_:
            return None
        if not self.fair:
            return min(open_, key=lambda p: heads[p])
        return min(open_, key=lambda p: (self.running[p] / self.weight(p), heads[p]))
