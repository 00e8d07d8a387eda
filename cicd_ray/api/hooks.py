"""The HTTP routes git hosts call: `POST /api/v1/hooks/github/{owner}/{repo}` and
`/api/v1/hooks/gitlab/{group}/{project}`. No bearer token: the delivery must carry the
repository's secret. The repository is named by the URL, so its secret is known before a
byte of the body is parsed: the body (at most HOOK_MAX_BYTES, GitHub's own cap on a
delivery) is verified as raw bytes, and only a signed one is parsed. A push or a pull (merge)
request of a repository in CICD_RAY_REPOS starts a run of the pipeline file in the repository
at that commit; a redelivery starts nothing new; other events are answered 202 and ignored."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from cicd_ray.api.dependencies import ConfigDep, MasterDep
from cicd_ray.errors import SourceError
from cicd_ray.names import API
from cicd_ray.protocol import Rejected, Submitted
from cicd_ray.secrets import SecretError, read
from cicd_ray.source import resolve_ref
from cicd_ray.triggers import githosts
from cicd_ray.triggers.repositories import RepoConfig, find

HOOK_MAX_BYTES = 25 * 1024 * 1024  # GitHub caps a delivery's payload at 25 MB
HEAD_TIMEOUT_S = 30.0  # asking the host for a branch's head
UNSIGNED = "the delivery's signature does not match the webhook secret of a repository at this URL"


async def _signed_payload(
    settings, provider: str, repo: RepoConfig | None, body: bytes, headers: dict[str, str]
) -> dict:
    """The delivery's payload, once its raw body is known to be signed with the repository's
    secret (401 otherwise, and for a repository not listed: nothing is parsed unsigned)."""
    secret = ""
    if repo is not None:
        try:
            secret = await asyncio.to_thread(
                read, settings.secrets_dir, repo.project, repo.webhook_secret
            )
        except SecretError:
            secret = ""  # nothing verifies: 401, as for a wrong signature
    if repo is None or not githosts.verified(provider, secret, body, headers):
        raise HTTPException(401, detail=UNSIGNED)
    try:  # signed by the repository's secret: now, and only now, it is parsed
        payload = await asyncio.to_thread(json.loads, body)
    except (ValueError, RecursionError):
        raise HTTPException(400, detail="the body is not JSON (or nests too deep)") from None
    if not isinstance(payload, dict):
        raise HTTPException(400, detail="the body is not a JSON object")
    if not repo.matches(githosts.repository_names(provider, payload)):
        raise HTTPException(400, detail=f"the delivery is of another repository than {repo.name}")
    return payload


async def _ignored(repo: RepoConfig, trigger: githosts.Trigger) -> str:
    """Why a push starts nothing (a branch not built, a commit no longer its head), or ""."""
    if trigger.event != "push":
        return ""
    if not repo.builds(trigger.branch):
        return f"branch {trigger.branch} is not one of {', '.join(repo.branches)}"
    return await asyncio.to_thread(_not_head, repo.url, trigger.branch, trigger.commit)


def _not_head(url: str, branch: str, commit: str) -> str:
    """Why a push is stale (its commit is no longer its branch's head: a replayed delivery,
    or one overtaken by a later push, whose own delivery builds the head), or ""."""
    try:
        head, _ = resolve_ref(url, branch, timeout_s=HEAD_TIMEOUT_S)
    except SourceError:
        return ""  # the host cannot say now: the run reads the file at the commit, or fails
    if head == commit:
        return ""
    return f"commit {commit[:12]} is no longer the head of branch {branch} ({head[:12]} is)"


async def _body(request: Request) -> bytes:
    """The raw body, refused (413) once past HOOK_MAX_BYTES, however it is sent."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > HOOK_MAX_BYTES:
        raise HTTPException(413, detail=f"a webhook delivery is at most {HOOK_MAX_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > HOOK_MAX_BYTES:
            raise HTTPException(413, detail=f"a webhook delivery is at most {HOOK_MAX_BYTES} bytes")
    return bytes(body)


router = APIRouter(tags=["webhooks"])


@router.post(f"{API}/hooks/{{provider}}", status_code=410, include_in_schema=False)
async def old_hook(provider: str):
    """The route before the repository was in the URL: it had to parse unsigned bodies
    to find the repository. Gone; the answer says where to point the webhook."""
    raise HTTPException(
        410,
        detail=f"point the webhook at {API}/hooks/{provider}/"
        "OWNER/REPO (the repository's name as in CICD_RAY_REPOS)",
    )


@router.post(f"{API}/hooks/{{provider}}/{{name:path}}", status_code=201)
async def hook(
    master: MasterDep,
    config: ConfigDep,
    provider: Literal["github", "gitlab"],
    name: str,
    request: Request,
):
    """A git host's delivery for the repository `name` (`owner/repo`): 401 without the
    repository's signature, and for a repository CICD_RAY_REPOS does not list (nothing
    is done, nothing is told); 413 over 25 MB; 400 for a signed body that is no JSON
    object, or names another repository; 202 for an event that starts nothing (the
    reason in `ignored`), 201 with the run started (200 for a redelivery: the run the
    first delivery started), 422 when the pipeline file cannot be used."""
    settings = config.settings
    repo = find(settings.repos, provider, [name])
    body = await _body(request)
    headers = {k.lower(): v for k, v in request.headers.items()}
    payload = await _signed_payload(settings, provider, repo, body, headers)
    trigger = githosts.trigger(provider, headers, payload)
    ignored = trigger if isinstance(trigger, str) else await _ignored(repo, trigger)
    if ignored:
        return JSONResponse({"ignored": ignored}, status_code=202)
    answer = await master.trigger(repo.name, trigger)
    if isinstance(answer, Rejected):
        return JSONResponse(
            {"detail": "; ".join(answer.problems), "problems": answer.problems}, status_code=422
        )
    assert isinstance(answer, Submitted)
    return JSONResponse(
        {
            "run_id": answer.run_id,
            "url": f"{API}/runs/{answer.run_id}",
            "existing": answer.existing,
        },
        status_code=200 if answer.existing else 201,
    )
