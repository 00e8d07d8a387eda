"""A step's key: a digest of everything that determines its result, part by part.

Two attempts with the same key belong to the same project and run the same script, with the
same variables, matrix values, pool and secrets' names, on the same source (the repository's
URL and the pinned commit, or the snapshot's digest), given the same artifacts, keeping the
same files. The project in the key makes results a project's own: another project's step of
the same pipeline, or one that asserts the same commit SHA through a git server of its own,
never finds them. A step with `reuse: true` whose key has a stored success is not run
again (the scheduler links that result); `explain` names the parts that differ from the last
success of the same step. Pure: the scheduler computes it when the step becomes ready.
"""

from __future__ import annotations

import hashlib
import json

from cicd_ray.pipeline.model import PlannedStep
from cicd_ray.records import ArtifactInput, RunRecord

PARTS = ("project", "script", "env", "matrix", "pool", "secrets", "source", "inputs", "outputs")
PART_DIGEST_CHARS = 16


def _digest(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def source_of(run: RunRecord) -> str:
    """What the run builds: the commit a git ref was pinned to, or the snapshot's digest."""
    if run.commit:
        url = run.source_git.git if run.source_git else ""
        return f"git:{url}@{run.commit}"
    if run.source_digest:
        return f"sha256:{run.source_digest}"
    return "none"


def key_parts(step: PlannedStep, run: RunRecord, inputs: list[ArtifactInput]) -> dict[str, str]:
    """A short digest per part of the key (what `explain` compares)."""
    matrix_env = {f"MATRIX_{k.upper()}" for k in step.matrix}
    values = {
        "project": run.project,
        "script": step.run,
        "env": {k: v for k, v in step.env.items() if k not in matrix_env},
        "matrix": step.matrix,
        "pool": step.pool,
        "secrets": sorted(step.secrets),
        "source": source_of(run),
        "inputs": sorted((i.step, f.path, f.digest) for i in inputs for f in i.files),
        "outputs": {"artifacts": step.artifacts},
    }
    return {part: _digest(values[part])[:PART_DIGEST_CHARS] for part in PARTS}


def key_of(parts: dict[str, str]) -> str:
    return _digest(parts)
