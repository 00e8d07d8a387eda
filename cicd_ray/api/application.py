"""The HTTP API's app: `create_app()` builds the FastAPI app from its routers (one module per
resource), its middleware and its link to the master. It holds no state. Writes go to the
master; reads of runs and logs come from the store itself (the master names it), so they go on
while the master restarts or the GCS is down. A pipeline is validated here too, so bad input
gets its 422 even when the master cannot answer. Nothing here imports Ray: `cicd_ray.api.serve`
wraps the app in a Serve deployment.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer

from cicd_ray import tokens
from cicd_ray.api import builds, cluster, flow, hooks, logs, runs, schedules
from cicd_ray.api.dependencies import (
    ApiConfig,
    run_scope,
)
from cicd_ray.api.link import RETRY_AFTER_S, MasterLink
from cicd_ray.api.middleware import BodyLimit, Guard
from cicd_ray.api.reads import ApiReads
from cicd_ray.config import Settings

WEB_TYPES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


HEALTH_CACHE_S = 1.0


def create_app(
    grants: list[tokens.Grant] | None = None,
    max_body_bytes: int | None = None,
    master: MasterLink | None = None,
) -> FastAPI:
    """The FastAPI app. Tokens' grants and the body limit default to this process's
    environment (see `cicd_ray.tokens`); `master` is how the master is reached (Ray, on a
    Serve replica: cicd_ray.api.serve); without one, what needs the master answers 503."""
    # No Swagger UI or ReDoc: they load third-party scripts. /openapi.json needs the token.
    app = FastAPI(
        title="cicd-ray",
        version="1",
        docs_url=None,
        redoc_url=None,
        description="Submit, watch and cancel CI/CD pipeline runs on Ray. Every "
        "endpoint but /healthz and the page needs 'Authorization: Bearer <token>'.",
    )
    master = master or MasterLink()  # none linked: what needs the master answers 503
    reads = ApiReads(master)
    config = ApiConfig(grants, max_body_bytes)
    # The outermost layer is added last: the token is checked before the body is counted.
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(Guard, grants=config.grants)
    # The OpenAPI document names the scheme; the check itself is Guard's, before any body.
    # A route naming a run sees it only if it is of the caller's project
    # (cicd_ray.api.dependencies).
    guarded = [Depends(HTTPBearer(auto_error=False)), Depends(run_scope)]
    # What the routes get by `Depends` (cicd_ray.api.dependencies).
    app.state.master, app.state.reads, app.state.config = master, reads, config
    app.state.health = _Health(master)
    app.include_router(router)  # the page and /healthz: open
    for part in (runs, logs, cluster, builds, flow, schedules):
        app.include_router(part.router, dependencies=guarded)
    app.include_router(hooks.router)  # git hosts sign their deliveries instead
    return app


def health_of(request: Request) -> _Health:
    return request.app.state.health


HealthDep = Annotated["_Health", Depends(health_of)]
router = APIRouter()


@router.get("/", include_in_schema=False)
async def page() -> Response:
    """The web page (no token needed to load it; it asks for one)."""
    return Response(_web_file("index.html"), media_type="text/html; charset=utf-8")


@router.get("/ui/{name}", include_in_schema=False)
async def page_file(name: str) -> Response:
    if name not in WEB_TYPES:
        raise HTTPException(404, detail=f"no file {name!r}")
    return Response(
        _web_file(name), media_type=WEB_TYPES[name], headers={"Cache-Control": "no-cache"}
    )


@router.get("/healthz", tags=["health"])
async def healthz(health: HealthDep) -> JSONResponse:
    """No authentication: says whether the master answers (asked at most once a second,
    however many probes come)."""
    ok, body = await health.check()
    if not ok:
        return JSONResponse(body, status_code=503, headers={"Retry-After": RETRY_AFTER_S})
    return JSONResponse(body)


class _Health:
    """The master's health, asked at most once per HEALTH_CACHE_S, however many probes come."""

    def __init__(self, master: MasterLink) -> None:
        self.master = master
        self._answer: tuple[bool, dict] | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def check(self) -> tuple[bool, dict]:
        async with self._lock:
            if self._answer is None or time.monotonic() - self._at > HEALTH_CACHE_S:
                try:
                    info = await self.master.ping()
                    self._answer = (True, {"status": "ok", "master": True, "pools": info["pools"]})
                except HTTPException as e:
                    self._answer = (
                        False,
                        {"status": "degraded", "master": False, "detail": e.detail},
                    )
                self._at = time.monotonic()
            return self._answer


def _web_file(name: str) -> bytes:
    return (resources.files("cicd_ray") / "web" / name).read_bytes()


def check_config() -> Settings:
    """Refuse bad token or body-limit settings in this process's environment (a replica's, at
    its start) with their message, rather than answering 500 to every request."""
    return Settings.from_env()
