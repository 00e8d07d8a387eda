"""A run's artifacts as a list a person or a script reads: every file its steps kept or took
over, with where to download it.
"""

from __future__ import annotations

from typing import Any

from cicd_ray.names import API
from cicd_ray.protocol import RunView


def artifact_list(view: RunView, step: str | None = None) -> list[dict[str, Any]]:
    """Every file a run's steps kept (or took over), with where to download it."""
    out = []
    for s in view.steps:
        if step is not None and s.name != step:
            continue
        origin = s.reused_from or s.carried_from
        for f in s.artifacts:
            out.append(
                {
                    "step": s.name,
                    "path": f.path,
                    "size": f.size,
                    "digest": f.digest,
                    "url": f"{API}/runs/{view.run.id}/artifacts/{s.name}/{f.path}",
                    "from_run": origin.run_id if origin else view.run.id,
                }
            )
    return out
