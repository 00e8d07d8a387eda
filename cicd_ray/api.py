"""The HTTP API: a FastAPI app that talks to the master by its name, served by Ray Serve.

`create_app()` builds the FastAPI app (on each Serve replica, so it reads the replica's
environment); `app` (import path `cicd_ray.api:app`) is the Serve application for `serve run`,
`serve deploy` and a RayService's `serveConfigV2`. The API holds no state. Writes go to the
master; reads of runs and logs come from the store itself (the master names it), so they go on
while the master restarts or the GCS is down. A pipeline is validated here too, so bad input
gets its 422 even when the master cannot answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import ray
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from cicd_ray import auth
from cicd_ray.access import Granted, caller, needs, not_found, run_scope, scope, submit_project
from cicd_ray.artifacts import ArtifactStore
from cicd_ray.auth import Role
from cicd_ray.buildroutes import build_routes
from cicd_ray.config import Settings
from cicd_ray.errors import SourceError, SpecError, StoreError
from cicd_ray.events import parse_position
from cicd_ray.explain import explain_answer
from cicd_ray.flowroutes import flow_routes
from cicd_ray.gate import BodyLimit, Guard
from cicd_ray.hookroutes import hook_routes
from cicd_ray.names import API, MASTER_NAME, NAMESPACE, RUN_ID
from cicd_ray.protocol import (
    LOG_POLL_S,
    RUN_WAIT_S,
    Conflict,
    LogSlice,
    Missing,
    OverQuota,
    Rejected,
    RunChange,
)
from cicd_ray.schedroutes import schedule_routes
from cicd_ray.source import check_archive
from cicd_ray.spec import GitSource, check_env_overrides, load_yaml, parse_pipeline
from cicd_ray.states import RunState
from cicd_ray.store import (
    Store,
    audit_page,
    log_answer,
    open_reader,
    run_project,
    run_view,
    runs_page,
)

MASTER_TIMEOUT_S = 10.0
RETRY_AFTER_S = "2"
WEB_TYPES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
HEALTH_CACHE_S = 1.0
EVENT_WAIT_S = 15.0  # the longest an event stream is silent (then a keep-alive comment)
POSITION = r"^[0-9.]{1,30}:[0-9]{1,18}$"  # EPOCH:SEQ, as a wait answered it
# A full step name: a base name, then a matrix suffix such as [py=3.11,os=linux].
RunId = Annotated[str, PathParam(pattern=RUN_ID, max_length=64)]
STEP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}(\[[A-Za-z0-9_=.,:+@ -]{1,400}\])?$")


class ArchiveSource(BaseModel):
    """A directory packed as a gzip'd tar, base64-encoded (what `cicd-ray submit` sends)."""

    model_config = ConfigDict(extra="forbid")
    archive: str = Field(description="base64 of a .tar.gz of the source directory")


class SubmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pipeline: str | dict[str, Any] = Field(description="the pipeline: YAML text or an object")
    env: dict[str, str] = Field(default_factory=dict, description="env overrides for every step")
    secrets: dict[str, str] = Field(
        default_factory=dict, description="the run's own secrets, given to the steps that list "
        "them (`secrets:`), masked in logs, never stored with the run, deleted when it ends")
    source: ArchiveSource | GitSource | None = Field(
        None, description="an uploaded archive, or a repository the workers clone (this "
        "replaces the pipeline's own `source`)")
    project: str | None = Field(
        None, pattern=auth.PROJECT_NAME.pattern,
        description="whose run it is: the token's project (an admin's token may name any)")


class RunCreated(BaseModel):
    run_id: str
    url: str


class MasterLink:
    """The master's handle, found by name and found again after the master restarts."""

    def __init__(self) -> None:
        self._handle = None

    async def call(self, method: str, *args: Any, timeout_s: float = MASTER_TIMEOUT_S) -> Any:
        try:
            return await asyncio.wait_for(self._call(method, *args), timeout_s)
        except (ValueError, ray.exceptions.RayError, asyncio.TimeoutError) as e:
            self._handle = None
            raise HTTPException(
                503, detail=f"the master is not answering ({type(e).__name__}); retry shortly",
                headers={"Retry-After": RETRY_AFTER_S}) from None

    async def _call(self, method: str, *args: Any) -> Any:
        if self._handle is None:
            # A lookup asks the GCS, which may be down: in a thread, so this replica's other
            # requests (reads from the store, 4xx answers) go on meanwhile.
            self._handle = await asyncio.to_thread(ray.get_actor, MASTER_NAME,
                                                   namespace=NAMESPACE)
        return await getattr(self._handle, method).remote(*args)


class _Reads:
    """Reads answered from the store the master writes, opened on first use; through the master
    while the store is unknown or not reachable from here (a SQLite file on another node)."""

    def __init__(self, master: MasterLink) -> None:
        self.master = master
        self._store: Store | None = None
        self._artifacts: ArtifactStore | None = None
        self._looked = False

    async def call(self, method: str, *args: Any) -> Any:
        store = await self._open()
        if store is None:
            return await self.master.call(method, *args)
        read = {"get_run": run_view, "list_runs": runs_page, "step_log": log_answer,
                "explain": explain_answer, "project_of": run_project,
                "audit": audit_page}[method]
        try:
            return await asyncio.to_thread(read, store, *args)
        except StoreError as e:
            raise HTTPException(503, detail=f"the store is not answering: {e}",
                                headers={"Retry-After": RETRY_AFTER_S}) from None

    async def artifacts(self) -> ArtifactStore:
        """The artifact store the master names (opened with this replica's credentials)."""
        await self._open()
        return self._artifacts

    async def _open(self) -> Store | None:
        if not self._looked:
            info = await self.master.call("ping")
            try:
                self._store = await asyncio.to_thread(open_reader, info["store"])
            except StoreError:
                self._store = None
            self._artifacts = await asyncio.to_thread(ArtifactStore, info["artifacts"])
            self._looked = True
        return self._store


def create_app(grants: list[auth.Grant] | None = None, max_body_bytes: int | None = None,
               master: MasterLink | None = None) -> FastAPI:
    """The FastAPI app. Tokens' grants and the body limit default to this process's
    environment (see `cicd_ray.auth`); the master defaults to the named actor."""
    # No Swagger UI or ReDoc: they load third-party scripts. /openapi.json needs the token.
    app = FastAPI(title="cicd-ray", version="1", docs_url=None, redoc_url=None,
                  description="Submit, watch and cancel CI/CD pipeline runs on Ray. Every "
                  "endpoint but /healthz and the page needs 'Authorization: Bearer <token>'.")
    master = master or MasterLink()
    reads = _Reads(master)
    config = _Config(grants, max_body_bytes)
    # The outermost layer is added last: the token is checked before the body is counted.
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(Guard, grants=config.grants)
    # The OpenAPI document names the scheme; the check itself is Guard's, before any body.
    # A route naming a run sees it only if it is of the caller's project (cicd_ray.access).
    guarded = [Depends(HTTPBearer(auto_error=False)), run_scope(reads)]
    app.include_router(_page_routes(_Health(master)))
    app.include_router(_submit_routes(master, config), dependencies=guarded)
    app.include_router(_run_routes(master, reads), dependencies=guarded)
    app.include_router(_log_routes(reads), dependencies=guarded)
    app.include_router(_cluster_routes(master, reads), dependencies=guarded)
    app.include_router(build_routes(master, reads), dependencies=guarded)
    app.include_router(flow_routes(master), dependencies=guarded)
    app.include_router(schedule_routes(master), dependencies=guarded)
    app.include_router(hook_routes(master, config))
    return app


def _page_routes(health: _Health) -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page() -> Response:
        """The web page (no token needed to load it; it asks for one)."""
        return Response(_web_file("index.html"), media_type="text/html; charset=utf-8")

    @router.get("/ui/{name}", include_in_schema=False)
    async def page_file(name: str) -> Response:
        if name not in WEB_TYPES:
            raise HTTPException(404, detail=f"no file {name!r}")
        return Response(_web_file(name), media_type=WEB_TYPES[name],
                        headers={"Cache-Control": "no-cache"})

    @router.get("/healthz", tags=["health"])
    async def healthz() -> JSONResponse:
        """No authentication: says whether the master answers (asked at most once a second,
        however many probes come)."""
        ok, body = await health.check()
        if not ok:
            return JSONResponse(body, status_code=503, headers={"Retry-After": RETRY_AFTER_S})
        return JSONResponse(body)

    return router


def _submit_routes(master: MasterLink, config: _Config) -> APIRouter:
    router = APIRouter(tags=["runs"])

    @router.post(f"{API}/runs", status_code=201, response_model=RunCreated,
                 responses={200: {"model": RunCreated}}, dependencies=[needs(Role.SUBMIT)])
    async def submit(req: SubmitRequest, response: Response, grant: Granted,
                     idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
                     authorization: Annotated[str | None, Header(include_in_schema=False)] = None):
        """Submit a run. 201 once the run is durable; 200 with the same run for a repeated
        `Idempotency-Key` (keys are the token's own); 409 for a key already used with another
        body; 413 past the body limit; 422 for an invalid pipeline; 429 when the project has
        its quota of queued runs."""
        project = submit_project(grant, req.project)
        limit = config.settings.max_pipeline_bytes
        pipeline, source = await _unpacked(req, limit)
        # Parsing and planning take time on a large document: off this replica's loop.
        problems = await asyncio.to_thread(_check, pipeline, req.env, limit)
        if problems:
            return _rejected(problems)
        key = _scoped_key(idempotency_key, authorization)
        answer = await master.call("submit", pipeline, req.env, source, key, req.secrets,
                                   caller(grant), project)
        if isinstance(answer, Rejected):
            return _rejected(answer.problems)
        if isinstance(answer, OverQuota):
            raise HTTPException(429, detail=answer.detail, headers={"Retry-After": "10"})
        if isinstance(answer, Conflict):
            raise HTTPException(409, detail=f"Idempotency-Key already used for run "
                                f"{answer.run_id} with a different request; use a new key")
        if answer.existing:
            response.status_code = 200
        return RunCreated(run_id=answer.run_id, url=f"{API}/runs/{answer.run_id}")

    return router


def _run_routes(master: MasterLink, reads: _Reads) -> APIRouter:
    router = APIRouter(tags=["runs"])

    @router.get(f"{API}/runs")
    async def list_runs(grant: Granted, state: RunState | None = None,
                        pipeline: Annotated[str | None, Query(max_length=63)] = None,
                        limit: Annotated[int, Query(ge=1, le=500)] = 50,
                        offset: Annotated[int, Query(ge=0)] = 0) -> dict:
        """Runs of the token's project (an admin's: of all), newest first, filtered by state
        and pipeline name, a page at a time."""
        runs = await reads.call("list_runs", state.value if state else None, pipeline, limit,
                                offset, scope(grant))
        return {"runs": runs, "limit": limit, "offset": offset}

    @router.get(f"{API}/runs/{{run_id}}")
    async def get_run(run_id: RunId) -> dict:
        """The run with every step (state, attempts, times, worker, exit code) and attempt."""
        view = await reads.call("get_run", run_id)
        if view is None:
            raise not_found(run_id)
        return view.model_dump(mode="json")

    @router.get(f"{API}/runs/{{run_id}}/wait", response_model=RunChange)
    async def wait(run_id: RunId,
                   after: Annotated[str | None, Query(pattern=POSITION, max_length=64)] = None,
                   timeout_s: Annotated[float, Query(ge=0, le=RUN_WAIT_S)] = RUN_WAIT_S,
                   until_end: bool = False):
        """A long poll: answers once the run has changed since `after` (the `position` of an
        earlier answer) or has ended (with `until_end=true`: only once it has ended), or after
        `timeout_s`; without `after`, at once. Follow a run with it: wait, read the run, wait
        from the position, read again."""
        change = await master.call("wait", run_id, after, timeout_s, until_end,
                                   timeout_s=timeout_s + MASTER_TIMEOUT_S)
        if change is None:
            raise HTTPException(404, detail=f"run {run_id!r} not found")
        return change

    @router.post(f"{API}/runs/{{run_id}}/cancel", dependencies=[needs(Role.SUBMIT)])
    async def cancel(run_id: RunId, grant: Granted) -> dict:
        """Cancel: queued steps at once, running steps' process groups killed. Idempotent."""
        state = await master.call("cancel", run_id, caller(grant))
        if state is None:
            raise HTTPException(404, detail=f"run {run_id!r} not found")
        return {"run_id": run_id, "state": state}

    @router.get(f"{API}/events", response_class=StreamingResponse,
                responses={200: {"content": {"text/event-stream": {}}}})
    async def events(grant: Granted,
                     run_id: Annotated[str | None, Query(pattern=RUN_ID, max_length=64)] = None,
                     last_event_id: Annotated[str | None, Header(max_length=64)] = None):
        """Run and step state changes of the token's project's runs (an admin's: of all) as
        Server-Sent Events (`event: run` or `step`, `data:` JSON), from now on, or after
        `Last-Event-ID` when a client reconnects. `run_id` keeps one run's. An `event: reset`
        says changes were missed (reload what you show)."""
        epoch, after = parse_position(last_event_id)
        return StreamingResponse(_event_stream(master, run_id, scope(grant), epoch, after),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    return router


def _log_routes(reads: _Reads) -> APIRouter:
    router = APIRouter(tags=["runs"])

    @router.get(f"{API}/runs/{{run_id}}/steps/{{step}}/log", response_class=StreamingResponse,
                responses={200: {"content": {"text/plain": {}}}})
    async def step_log(run_id: RunId, step: str,
                       follow: bool = False, offset: Annotated[int, Query(ge=0)] = 0,
                       attempt: Annotated[int | None, Query(ge=1)] = None):
        """A step's log as text (its last attempt unless `attempt` is given), from byte `offset`.
        With `follow=true` the response streams until the attempt ends. The `X-Attempt` header
        names the attempt (`X-Attempt-State` its state, `X-More` whether its log can still
        grow), so a client that lost the stream resumes with `offset` and it."""
        if not STEP.match(step):
            raise HTTPException(422, detail=f"step {step!r} is not a valid step name")
        first = await reads.call("step_log", run_id, step, attempt, offset)
        if isinstance(first, Missing):
            raise HTTPException(404, detail=first.detail)
        headers = {"X-Attempt": str(first.attempt or ""), "X-Attempt-State": first.state,
                   "X-More": "true" if first.more else "false", "Cache-Control": "no-store"}
        if not follow:
            return Response(first.data, media_type="text/plain; charset=utf-8",
                            headers=headers)
        return StreamingResponse(_follow(reads, run_id, step, attempt, offset, first),
                                 media_type="text/plain; charset=utf-8", headers=headers)

    return router


def _cluster_routes(master: MasterLink, reads: _Reads) -> APIRouter:
    router = APIRouter(tags=["cluster"])

    @router.get(f"{API}/workers")
    async def workers(grant: Granted,
                      since: Annotated[float | None, Query(ge=0)] = None) -> dict:
        """The live workers and those stopped since `since` (a Unix time; default: the last
        10 minutes): pool, node, state, times, CPUs in use, last heartbeat, CPU and memory,
        and the attempts each runs (of the token's project's runs; an admin's: all)."""
        return {"workers": await master.call("workers", since, scope(grant))}

    @router.get(f"{API}/audit", dependencies=[needs(Role.ADMIN)])
    async def audit(limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                    offset: Annotated[int, Query(ge=0)] = 0) -> dict:
        """Who submitted, cancelled, re-ran, approved or rejected what, newest first: the
        token's id (the start of its digest) and project, the action, the run and its project,
        the step. Admin tokens only."""
        return {"audit": await reads.call("audit", limit, offset), "limit": limit,
                "offset": offset}

    @router.get(f"{API}/queue")
    async def queue() -> dict:
        """Steps ready and waiting for a slot, per pool, and the oldest one's wait."""
        return {"pools": await master.call("queue")}

    return router


async def _unpacked(req: SubmitRequest,
                    limit: int) -> tuple[str | dict[str, Any], tuple[str, bytes] | None]:
    """The request's pipeline (with a git source put in it) and its archive (digest, bytes)."""
    if isinstance(req.source, GitSource):
        return await asyncio.to_thread(_with_git_source, req.pipeline, req.source, limit), None
    if req.source is None:
        return req.pipeline, None
    try:
        data = base64.b64decode(req.source.archive, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, detail="source.archive: not valid base64") from None
    try:
        await asyncio.to_thread(check_archive, data)
    except SourceError as e:
        raise HTTPException(422, detail=str(e)) from None
    return req.pipeline, (hashlib.sha256(data).hexdigest(), data)


def _rejected(problems: list[str]) -> JSONResponse:
    return JSONResponse({"detail": "; ".join(problems), "problems": problems}, status_code=422)


def _scoped_key(key: str | None, authorization: str | None) -> str | None:
    """An Idempotency-Key as the token's own: two tokens using one key do not meet."""
    if not key:
        return None
    token = (authorization or "").partition(" ")[2].strip()
    return hashlib.sha256(f"{auth.digest(token)}:{key}".encode()).hexdigest()


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
                    info = await self.master.call("ping")
                    self._answer = (True, {"status": "ok", "master": True,
                                           "pools": info["pools"]})
                except HTTPException as e:
                    self._answer = (False, {"status": "degraded", "master": False,
                                            "detail": e.detail})
                self._at = time.monotonic()
            return self._answer


def _check(pipeline: str | dict[str, Any], env: dict[str, str], limit: int) -> list[str]:
    """The problems this replica can see without the master (which also checks pools)."""
    try:
        parse_pipeline(pipeline, max_bytes=limit, measure_objects=True)
    except SpecError as e:
        return e.problems
    return check_env_overrides(env)


def _with_git_source(pipeline: str | dict[str, Any], git: GitSource,
                     limit: int) -> str | dict[str, Any]:
    """The pipeline with its `source` replaced by the request's repository."""
    if isinstance(pipeline, str):
        try:
            loaded = load_yaml(pipeline, max_bytes=limit)
        except SpecError:
            return pipeline  # _check reports it
        if not isinstance(loaded, dict):
            return pipeline
        pipeline = loaded
    return {**pipeline, "source": git.model_dump()}


class _Config:
    """The API's settings: given, or read from the environment where the app runs."""

    def __init__(self, grants: list[auth.Grant] | None, max_body_bytes: int | None) -> None:
        self._book = auth.TokenBook(grants) if grants is not None else None
        self._limit = max_body_bytes
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    def grants(self) -> list[auth.Grant]:
        if self._book is None:
            self._book = self.settings.token_book()
        return self._book.grants()

    def max_body_bytes(self) -> int:
        if self._limit is None:
            self._limit = self.settings.max_body_bytes
        return self._limit


async def _follow(reads: _Reads, run_id: str, step: str, attempt: int | None, offset: int,
                  answer: LogSlice) -> AsyncIterator[bytes]:
    # Follow one attempt: the one that was current when the request came, or the first one.
    pinned = attempt or answer.attempt
    while True:
        if answer.data:
            offset += len(answer.data)
            yield answer.data
        if not answer.more:
            return
        await asyncio.sleep(LOG_POLL_S)
        try:
            answer = await reads.call("step_log", run_id, step, pinned, offset)
        except HTTPException:
            return  # the master went away mid-stream: the client resumes from its offset
        if isinstance(answer, Missing):
            return
        if pinned is None and answer.attempt is not None:
            pinned = answer.attempt


def _web_file(name: str) -> bytes:
    return (resources.files("cicd_ray") / "web" / name).read_bytes()


async def _event_stream(master: MasterLink, run_id: str | None, project: str | None,
                        epoch: float | None, after: int) -> AsyncIterator[bytes]:
    yield b"retry: 2000\n\n"
    while True:
        try:
            # A new client only learns where "now" is: no waiting, nothing sent.
            answer = await master.call("events", max(after, 0), epoch,
                                       0.0 if after < 0 else EVENT_WAIT_S)
        except HTTPException:
            yield b": the master is not answering; waiting\n\n"
            await asyncio.sleep(float(RETRY_AFTER_S))
            continue
        restarted = epoch is not None and answer["epoch"] != epoch
        events = answer["events"]
        if after < 0:  # a new client: from now on
            events = []
            after = max((e["seq"] for e in answer["events"]), default=0)
        elif answer["reset"] or answer["gap"] or restarted:
            yield b"event: reset\ndata: {}\n\n"
        epoch = answer["epoch"]
        for event in events:
            after = event["seq"]
            if (run_id is None or event["run_id"] == run_id) and (
                    project is None or event.get("project", "default") == project):
                yield (f"id: {epoch}:{after}\nevent: {event['kind']}\n"
                       f"data: {json.dumps(event)}\n\n").encode()
        if not events:
            yield b": keep-alive\n\n"


# The handlers only await the master, so one replica can serve many requests at once.
# A line per request in Serve's access log costs more than the request's own work here; the
# master records every submission anyway.
@serve.deployment(name="cicd-api", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=200,
                  logging_config={"enable_access_log": False, "log_level": "WARNING"})
@serve.ingress(create_app)  # built on each replica, with its environment
class ApiServer:
    """The Serve deployment wrapping the FastAPI app."""

    def __init__(self) -> None:
        # Where the app is the whole deployment (a RayService's serveConfigV2), nothing else
        # creates the master: make sure it exists, configured from this replica's environment.
        # A master already running is left as it is. Not waited for: /healthz tells.
        from cicd_ray.master import master_actor

        settings = check_config()
        master_actor(settings).remote(settings)


def check_config() -> Settings:
    """Refuse bad token or body-limit settings in this process's environment (a replica's, at
    its start) with their message, rather than answering 500 to every request."""
    return Settings.from_env()


def build(grants: list[auth.Grant], tokens_file: Path | None = None,
          max_body_bytes: int | None = None, settings: Settings | None = None):
    """The Serve application with its configuration in the replicas' environment (grants by
    the tokens' digests, never the tokens; the tokens file they read again when it changes;
    from `settings`, the repositories file and the secrets folder webhooks are checked
    with)."""
    env = {auth.DIGESTS_ENV: ",".join(g.line for g in grants)}
    if tokens_file is not None:
        env["CICD_RAY_TOKENS_FILE"] = str(tokens_file)
    if settings is not None and settings.repos_file is not None:
        env["CICD_RAY_REPOS"] = str(settings.repos_file)
    if settings is not None and settings.secrets_dir is not None:
        env["CICD_RAY_SECRETS_DIR"] = str(settings.secrets_dir)
    if max_body_bytes:
        env["CICD_RAY_MAX_BODY_BYTES"] = str(max_body_bytes)
    return ApiServer.options(ray_actor_options={
        "num_cpus": 0, "runtime_env": {"env_vars": env}}).bind()


app = ApiServer.bind()
