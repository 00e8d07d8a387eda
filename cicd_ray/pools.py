"""The worker pools and the projects that share them: what the pools file and the projects file
hold. Pure data with their checks, so the scheduler can import them without the settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from cicd_ray import tokens
from cicd_ray.errors import SpecError
from cicd_ray.pipeline import yamldoc
from cicd_ray.pipeline.model import (
    PIPELINE_NAME,
)

# Kubernetes label keys ([prefix/]name) and values, for a pool's node_selector and tolerations.
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)


LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"


LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY, max_length=317)]


LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE)]


class Toleration(BaseModel):
    """A Kubernetes toleration for a pool's pods (the taint of the nodes it should run on)."""

    model_config = ConfigDict(extra="forbid")

    key: LabelKey | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = Field(None, ge=0)  # Kubernetes' own name


class PoolConfig(BaseModel):
    """One pool of identical worker actors, sized from its queue. Steps name their pool."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(pattern=PIPELINE_NAME)]
    cpus: float = Field(2.0, gt=0, le=1024, description="CPUs of one worker")
    memory_mb: int = Field(4096, ge=0, description="memory of one worker")
    # Custom Ray resources each worker asks for, e.g. {"pool-linux": 1}: only nodes started
    # with them (`ray start --resources`, a KubeRay worker group's rayStartParams) take it.
    resources: dict[str, float] = Field(default_factory=dict)
    slots: int | None = Field(
        None,
        ge=1,
        description="most steps a worker runs at once (unset: as many as its CPUs and memory fit)",
    )
    workers: int | None = Field(
        None, ge=0, le=1000, description="a fixed size: sets min_workers and max_workers"
    )
    min_workers: int = Field(0, ge=0, le=1000)
    max_workers: int = Field(2, ge=0, le=1000)
    scale_up_step: int = Field(4, ge=1, description="most workers started at once")
    cooldown_s: float = Field(5.0, ge=0, description="time between two scale-ups")
    window_s: float = Field(
        60.0, ge=0, description="scale down only below the highest need seen over this long"
    )
    idle_timeout_s: float = Field(60.0, ge=0, description="a worker idle this long may go")
    target_utilization: float = Field(
        1.0, gt=0, le=1, description="the share of a worker's CPUs the sizer plans to fill"
    )
    price_per_hour: float = Field(0.0, ge=0, description="what a worker costs an hour")
    budget_per_hour: float | None = Field(
        None, ge=0, description="the most the pool may spend an hour"
    )
    spot: bool = Field(False, description="workers on interruptible capacity")
    spot_for: list[str] = Field(
        default_factory=list,
        description="a spot pool: the pools whose steps marked interruptible it may run",
    )
    priority: int = Field(
        0, description="a higher-priority pool gets room first when the cluster is full"
    )
    # On KubeRay (cicd-ray kuberay): the pool's worker group runs on nodes with these labels,
    # tolerating these taints, from this image (default: the cluster's).
    node_selector: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    image: Annotated[str, StringConstraints(pattern=r"^[^\s]{1,512}$")] | None = None

    @model_validator(mode="after")
    def _sizes(self) -> PoolConfig:
        if self.workers is not None:
            given = {
                f: getattr(self, f)
                for f in ("min_workers", "max_workers")
                if f in self.model_fields_set
            }
            if any(v != self.workers for v in given.values()):
                raise ValueError(
                    f"pool {self.name!r}: give either workers (a fixed size) or "
                    "min_workers and max_workers, not both"
                )
            self.min_workers = self.max_workers = self.workers
        elif "max_workers" not in self.model_fields_set:
            self.max_workers = max(self.max_workers, self.min_workers)
        if self.spot_for and not self.spot:
            raise ValueError(f"pool {self.name!r}: spot_for is for spot pools; add spot: true")
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"pool {self.name!r}: min_workers {self.min_workers} is more than "
                f"max_workers {self.max_workers}"
            )
        return self


class ProjectConfig(BaseModel):
    """A project's share of the fleet and its quotas (CICD_RAY_PROJECTS); a project not listed
    has weight 1 and no quotas."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=tokens.PROJECT_NAME.pattern)
    weight: float = Field(1.0, gt=0, le=1000)  # its share of contended pools, relative
    max_running_steps: int | None = Field(None, ge=1)  # more stay queued
    max_queued_runs: int | None = Field(None, ge=1)  # more are refused (429)
    # The pools its steps may name (empty: every pool). Checked at submission: 422.
    pools: list[str] = Field(default_factory=list)


def load_projects(path: str | Path) -> dict[str, ProjectConfig]:
    """Read a projects file: `projects: [{name: web, weight: 2, max_running_steps: 20,
    max_queued_runs: 50}, ...]`."""
    return {p.name: p for p in yamldoc.load_list(path, "projects", ProjectConfig)}


def default_pools() -> dict[str, PoolConfig]:
    """One pool with a warm worker that grows to two under load."""
    return {"default": PoolConfig(name="default", min_workers=1, max_workers=2)}


def load_pools(path: str | Path) -> dict[str, PoolConfig]:
    """Read a pools file: `pools: [{name: default, workers: 2, cpus: 2, memory_mb: 4096}, ...]`."""
    pools = yamldoc.load_list(path, "pools", PoolConfig)
    names = {p.name for p in pools}
    unknown = [
        f"pools ({p.name}).spot_for: unknown pool {n!r}; the pools are: {', '.join(sorted(names))}"
        for p in pools
        for n in p.spot_for
        if n not in names
    ]
    if unknown:
        raise SpecError(unknown, source=str(path))
    return {p.name: p for p in pools}
