"""The HTTP routes git hosts call: `POST /api/v1/hooks/github` and `/api/v1/hooks/gitlab`.
No bearer token: the delivery must carry the repository's secret (its signature, checked
before anything is done). A push or a pull (merge) request of a repository in
CICD_RAY_REPOS starts a run of the pipeline file in the repository at that commit; a
redelivery starts nothing new; other events are answered 202 and ignored."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from cicd_ray import hooks
from cicd_ray.names import API
from cicd_ray.protocol import Rejected, Submitted
from cicd_ray.repos import find
from cicd_ray.secrets import SecretError, read


def hook_routes(master, config) -> APIRouter:
    router = APIRouter(tags=["webhooks"])

    @router.post(f"{API}/hooks/{{provider}}", status_code=201)
    async def hook(provider: Literal["github", "gitlab"], request: Request):
        """A git host's delivery: 401 without the repository's signature (nothing is done),
        404 for a repository CICD_RAY_REPOS does not list, 202 for an event that starts
        nothing (the reason in `ignored`), 201 with the run started (200 for a redelivery:
        the run the first delivery started), 422 when the pipeline file cannot be used."""
        settings = config.settings
        body = await request.body()
        try:
            payload = await asyncio.to_thread(json.loads, body)
        except (ValueError, RecursionError):
            raise HTTPException(400, detail="the body is not JSON (or nests too deep)") from None
        if not isinstance(payload, dict):
            raise HTTPException(400, detail="the body is not a JSON object")
        names = hooks.repository_names(provider, payload)
        repo = find(settings.repos, provider, names)
        if repo is None:
            raise HTTPException(404, detail=f"no {provider} repository named "
                                f"{names[0] if names else '(none)'} in CICD_RAY_REPOS")
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            secret = await asyncio.to_thread(read, settings.secrets_dir, repo.project,
                                             repo.webhook_secret)
        except SecretError:
            secret = ""  # nothing verifies: 401, as for a wrong signature
        if not hooks.verified(provider, secret, body, headers):
            raise HTTPException(401, detail="the delivery's signature does not match the "
                                "repository's webhook secret")
        trigger = hooks.trigger(provider, headers, payload)
        if isinstance(trigger, str):
            return JSONResponse({"ignored": trigger}, status_code=202)
        if trigger.event == "push" and not repo.builds(trigger.branch):
            return JSONResponse({"ignored": f"branch {trigger.branch} is not one of "
                                 f"{', '.join(repo.branches)}"}, status_code=202)
        answer = await master.call("trigger", repo.name, trigger, timeout_s=120.0)
        if isinstance(answer, Rejected):
            return JSONResponse({"detail": "; ".join(answer.problems),
                                 "problems": answer.problems}, status_code=422)
        assert isinstance(answer, Submitted)
        return JSONResponse({"run_id": answer.run_id, "url": f"{API}/runs/{answer.run_id}",
                             "existing": answer.existing},
                            status_code=200 if answer.existing else 201)

    return router
