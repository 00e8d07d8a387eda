"""The repositories file (CICD_RAY_REPOS): which git repositories may start runs by webhook,
of which project, with which secrets, and where their commit statuses go.

    repositories:
      - name: acme/web-app            # the event's repository full name (or its clone URL)
        url: https://github.com/acme/web-app.git
        provider: github              # or gitlab
        project: web
        webhook_secret: HOOK_SECRET   # the name of one of the project's secrets
        pipeline: .cicd-ray.yaml
        branches: ["*"]
        status_url: https://api.github.com
        status_token: STATUS_TOKEN
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from cicd_ray.errors import SpecError
from cicd_ray.pipeline import yamldoc
from cicd_ray.pipeline.model import ENV_NAME, WEBHOOK_URL
from cicd_ray.tokens import DEFAULT_PROJECT, PROJECT_NAME
from cicd_ray.triggers.cron import ScheduleSpec

SecretName = Annotated[str, StringConstraints(pattern=ENV_NAME, max_length=128)]
# A path in the repository: relative, of plain names (and none of them "." or "..").
PIPELINE_PATH = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$"


class RepoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._/-]{1,255}$")]
    url: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    provider: Literal["github", "gitlab"]
    project: Annotated[str, StringConstraints(pattern=PROJECT_NAME.pattern)] = DEFAULT_PROJECT
    webhook_secret: SecretName
    pipeline: Annotated[str, StringConstraints(pattern=PIPELINE_PATH, max_length=255)] = (
        ".cicd-ray.yaml"
    )
    branches: list[Annotated[str, StringConstraints(min_length=1, max_length=255)]] = Field(
        default_factory=lambda: ["*"]
    )
    status_url: Annotated[str, StringConstraints(pattern=WEBHOOK_URL)] | None = None
    status_token: SecretName | None = None

    @field_validator("pipeline")
    @classmethod
    def _inside(cls, path: str) -> str:
        if any(part in (".", "..") for part in path.split("/")):
            raise ValueError(f"{path!r}: a path inside the repository, without . or ..")
        return path

    def builds(self, branch: str) -> bool:
        """Whether a push to `branch` starts a run (`branches`: shell-style patterns)."""
        return any(fnmatch.fnmatchcase(branch, pattern) for pattern in self.branches)

    def matches(self, names: list[str]) -> bool:
        """Whether an event naming the repository as any of `names` (a full name, clone URLs)
        is of this repository."""
        mine = {_plain(self.name), _plain(self.url)}
        return any(_plain(n) in mine for n in names if n)


def _plain(name: str) -> str:
    return name.lower().rstrip("/").removesuffix(".git")


def load_repos(path: str | Path) -> dict[str, RepoConfig]:
    """Read a repositories file; SpecError names what is wrong."""
    repos = yamldoc.load_list(path, "repositories", RepoConfig)
    if len({r.name for r in repos}) != len(repos):
        raise SpecError(["repositories: a name is listed twice"], source=str(path))
    missing = [
        f"repositories ({r.name}): status_url and status_token go together"
        for r in repos
        if (r.status_url is None) != (r.status_token is None)
    ]
    if missing:
        raise SpecError(missing, source=str(path))
    return {r.name: r for r in repos}


def load_schedules(path: str | Path, repos: dict[str, RepoConfig]) -> list[ScheduleSpec]:
    """The repositories file's `schedules:` (none without one): each runs a listed
    repository's pipeline file at its `ref`, as a run of the repository's project."""
    schedules = yamldoc.load_list(path, "schedules", ScheduleSpec, required=False)
    problems = [
        f"schedules ({s.name}).repository: {s.repository!r} is not one of the "
        f"repositories: {', '.join(sorted(repos)) or '(none)'}"
        for s in schedules
        if s.repository not in repos
    ]
    problems += [
        f"schedules ({s.name}): a schedule here runs its repository's pipeline "
        "file; `pipeline:` is for schedules made through the API"
        for s in schedules
        if s.pipeline
    ]
    if len({s.name for s in schedules}) != len(schedules):
        problems.append("schedules: a name is listed twice")
    if problems:
        raise SpecError(problems, source=str(path))
    return schedules


def find(repos: dict[str, RepoConfig], provider: str, names: list[str]) -> RepoConfig | None:
    return next((r for r in repos.values() if r.provider == provider and r.matches(names)), None)
