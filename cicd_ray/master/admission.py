"""A submission checked and planned, pure (the master runs it off its loop): the pipeline
parsed and expanded, its env, pools, notifications, secrets and source checked, its git ref
pinned to a commit; the digest a repeated Idempotency-Key is compared by; the key a webhook's
delivery is remembered by; run ids.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cicd_ray.config import Settings
from cicd_ray.errors import SourceError, SpecError
from cicd_ray.notify.webhooks import TargetRefused, checked_host, refused_targets
from cicd_ray.pipeline.graph import check_env_overrides, expanded, plan, planned_bytes
from cicd_ray.pipeline.load import parse_pipeline
from cicd_ray.pipeline.model import ConcurrencySpec, GitSource, PipelineSpec, PlannedStep
from cicd_ray.protocol import SourceRef
from cicd_ray.scheduler import check_fits
from cicd_ray.secrets import missing, run_secret_problems
from cicd_ray.source import resolve_ref
from cicd_ray.triggers.githosts import Trigger
from cicd_ray.triggers.repositories import RepoConfig


@dataclass
class Planned:
    """A submission checked and planned (pure work, done off the master's loop)."""

    spec: PipelineSpec | None
    steps: list[PlannedStep]
    problems: list[str]
    request: str  # digest of the request, compared when an Idempotency-Key is repeated
    commit: str | None = None  # the SHA a git source's ref named at submission
    branch: str = ""  # the branch that ref named, if it named one
    concurrency: ConcurrencySpec | None = None  # the run's group, expanded from its env
    project: str = "default"  # whose run it is
    event: str = "manual"  # what started it (a webhook: push, pull_request)
    pr: int | None = None
    fork: bool = False  # a fork's pull request: no secrets, no cache saves
    repo: str = ""  # the repository whose webhook started it
    scheduled_for: float | None = None  # the slot of the schedule that started it


def plan_submission(
    pipeline: dict | str,
    env: dict[str, str],
    source: SourceRef | None,
    settings: Settings,
    request: str | None = None,
    resolve: Callable[[str, str], tuple[str, str]] = resolve_ref,
    secrets: dict[str, str] | None = None,
    project: str = "default",
    git_allow: list[str] | None = None,
    source_stored: Callable[[str], bool] = lambda digest: True,
) -> Planned:
    """(spec, planned steps, problems) of a submission, its request digest, and the commit its
    git source is pinned to, with the branch its ref named (`resolve` asks the repository: the
    one step that is not pure). `git_allow`: for a submission through the API, what its git
    source may name beyond public hosts (None: anything, the cluster's own callers)."""
    secrets = secrets or {}
    request = request or request_digest(pipeline, env, source, list(secrets))
    try:
        spec = parse_pipeline(pipeline, max_bytes=settings.max_pipeline_bytes)
        problems = check_env_overrides(env)
        steps = plan(spec, env) if not problems else []
        group = expanded(spec.concurrency, {**spec.env, **env}, "concurrency.group")
    except SpecError as e:
        return Planned(None, [], e.problems, request, project=project)
    weight = planned_bytes(steps)
    if weight > settings.max_planned_bytes:
        problems.append(
            f"steps: the planned steps' scripts and envs come to "
            f"{weight} bytes, more than the "
            f"{settings.max_planned_bytes} a run may have "
            "(CICD_RAY_MAX_PLANNED_BYTES): set large variables once, or in fewer "
            "steps"
        )
    problems += check_fits(steps, settings.pools)
    problems += pool_problems(steps, settings, project)
    problems += [
        f"notify[{i}].webhook: {why}"
        for i, why in refused_targets([n.webhook for n in spec.notify], settings.webhook_allow)
    ]
    problems += run_secret_problems(secrets)
    problems += _secret_problems(steps, secrets, settings, project)
    if source is not None and source.size > settings.source_limit_bytes:
        problems.append(
            f"source: {source.size} bytes is more than the {settings.source_limit_bytes} byte limit"
        )
    elif source is not None and not source_stored(source.digest):
        problems.append(f"source: snapshot sha256:{source.digest} is not in the artifact store")
    if git_allow is not None and source is None and isinstance(spec.source, GitSource):
        problems += git_source_problems(spec.source.git, git_allow)
    commit, branch = None, ""
    if not problems and source is None and isinstance(spec.source, GitSource):
        try:
            commit, branch = resolve(spec.source.git, spec.source.ref)
        except SourceError as e:
            problems.append(f"source.ref: {e}")
    return Planned(spec, steps, problems, request, commit, branch, group, project)


def _secret_problems(
    steps: list[PlannedStep], secrets: dict[str, str], settings: Settings, project: str
) -> list[str]:
    """The project secrets the steps list that a step may not have (the control plane's) or
    that are not there; the submission's own are given as they are."""
    listed = {
        (s.base, name)
        for s in steps
        for name in s.secrets  # variants list the same
        if name not in secrets
    }  # the submission's own
    control = control_secrets(settings, project)
    problems = [
        f"steps[{base}].secrets: {name} is {control[name]}: the control plane's, never a step's"
        for base, name in sorted(listed)
        if name in control
    ]
    listed = {(base, name) for base, name in listed if name not in control}
    problems += [
        f"steps[{base}].secrets: {why}"
        for base, name in sorted(listed)
        for why in missing(settings.secrets_dir, project, [name])
    ]
    return problems


def git_source_problems(url: str, allow: list[str]) -> list[str]:
    """Why a git source sent through the API may not be fetched: a local repository (`file://`:
    the machine's own files, read by the master and the workers) unless CICD_RAY_GIT_ALLOW
    lists `file`, or a host that is (or resolves to) an internal address it does not list,
    checked like a notification's target. Checked before git is asked anything."""
    if url.startswith("file://"):
        if "file" in allow:
            return []
        return [
            f"source.git: {url}: local repositories are not accepted through the API "
            "(CICD_RAY_GIT_ALLOW=file allows them)"
        ]
    host, port = git_host(url)
    try:
        checked_host(host, port, allow)
    except TargetRefused as e:
        return [f"source.git: {e} (CICD_RAY_GIT_ALLOW)"]
    return []


def git_host(url: str) -> tuple[str, int]:
    """The host and port a git URL reaches: https://h/..., ssh://u@h:p/..., git@h:path."""
    if "://" not in url:  # scp-like: user@host:path
        return url.split("@", 1)[-1].split(":", 1)[0], 22
    parts = urlsplit(url)
    default = {"https": 443, "http": 80, "ssh": 22, "git": 9418}.get(parts.scheme, 443)
    return parts.hostname or "", parts.port or default


def control_secrets(settings: Settings, project: str) -> dict[str, str]:
    """The project's secrets the control plane uses (a repository's webhook secret, its
    status token), by name, with what each is: no step may list them."""
    out = {}
    for repo in settings.repos.values():
        if repo.project == project:
            out[repo.webhook_secret] = f"the webhook secret of repository {repo.name}"
            if repo.status_token:
                out[repo.status_token] = f"the status token of repository {repo.name}"
    return out


def pool_problems(steps: list[PlannedStep], settings: Settings, project: str) -> list[str]:
    """Steps naming a pool their project may not use (the projects file's `pools:`)."""
    config = settings.projects.get(project)
    allowed = config.pools if config is not None else []
    if not allowed:
        return []
    named = sorted({(s.base, s.pool) for s in steps if s.pool not in allowed})
    return [
        f"steps[{base}].pool: project {project} may not use pool {pool}; its pools are "
        f"{', '.join(allowed)}"
        for base, pool in named
    ]


def request_digest(
    pipeline: dict | str,
    env: dict[str, str] | None,
    source: SourceRef | None,
    secret_names: list[str] | None = None,
) -> str:
    """What a repeated Idempotency-Key is compared by: the pipeline, env, source and the names
    of the submission's own secrets (never their values: a digest of a short value could be
    guessed back from the store)."""
    parts = [pipeline, env or {}, source.digest if source else None]
    if secret_names:  # (without any, the digest is what it was before secrets came)
        parts.append(sorted(secret_names))
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def hook_key(repo: RepoConfig, trigger: Trigger) -> str:
    """The key a webhook's delivery is remembered by (for a day, as an Idempotency-Key): what
    it asks for (the repository, event, branch, commit and pull request), not its delivery id,
    so a redelivery, and a captured body replayed with a new delivery id, start nothing new."""
    text = (
        f"hook:{repo.provider}:{repo.name}:{trigger.event}:{trigger.branch}:"
        f"{trigger.commit}:{trigger.pr}"
    )
    return hashlib.sha256(text.encode()).hexdigest()


def new_run_id(now: float) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + uuid.uuid4().hex[:6]
