"""The HTTP routes of runs: submit, list, read, wait for, cancel, and the event stream of their
changes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse

from cicd_ray import tokens
from cicd_ray.api.dependencies import (
    ConfigDep,
    Granted,
    MasterDep,
    ReadsDep,
    RunId,
    caller,
    needs,
    not_found,
    scope,
    submit_project,
)
from cicd_ray.api.link import RETRY_AFTER_S, MasterLink
from cicd_ray.api.reads import ApiReads
from cicd_ray.errors import SourceError, SpecError
from cicd_ray.master.events import parse_position
from cicd_ray.names import API, RUN_ID
from cicd_ray.pipeline.graph import check_env_overrides
from cicd_ray.pipeline.load import load_yaml, parse_pipeline
from cicd_ray.pipeline.model import GitSource
from cicd_ray.protocol import (
    RUN_WAIT_S,
    Conflict,
    OverQuota,
    Rejected,
    RunChange,
    RunCreated,
    SourceRef,
    SubmitCommand,
    SubmitRequest,
)
from cicd_ray.source import check_archive
from cicd_ray.states import RunState
from cicd_ray.tokens import Role

EVENT_WAIT_S = 15.0  # the longest an event stream is silent (then a keep-alive comment)


POSITION = r"^[0-9.]{1,30}:[0-9]{1,18}$"  # EPOCH:SEQ, as a wait answered it


router = APIRouter(tags=["runs"])


@router.post(
    f"{API}/runs",
    status_code=201,
    response_model=RunCreated,
    responses={200: {"model": RunCreated}},
    dependencies=[needs(Role.SUBMIT)],
)
async def submit(
    master: MasterDep,
    reads: ReadsDep,
    config: ConfigDep,
    req: SubmitRequest,
    response: Response,
    grant: Granted,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
):
    """Submit a run. 201 once the run is durable; 200 with the same run for a repeated
    `Idempotency-Key` (keys are the token's own); 409 for a key already used with another
    body; 413 past the body limit; 422 for an invalid pipeline; 429 when the project has
    its quota of queued runs."""
    project = submit_project(grant, req.project)
    limit = config.settings.max_pipeline_bytes
    pipeline, archive = await _unpacked(req, limit)
    # Parsing and planning take time on a large document: off this replica's loop.
    problems = await asyncio.to_thread(_check, pipeline, req.env, limit)
    if problems:
        return _rejected(problems)
    source = await _stored(reads, archive) if archive is not None else None
    key = _scoped_key(idempotency_key, authorization)
    answer = await master.submit(
        SubmitCommand(
            pipeline=pipeline,
            env=req.env,
            source=source,
            idempotency_key=key,
            secrets=req.secrets,
            caller=caller(grant),
            project=project,
        )
    )
    if isinstance(answer, Rejected):
        return _rejected(answer.problems)
    if isinstance(answer, OverQuota):
        raise HTTPException(429, detail=answer.detail, headers={"Retry-After": "10"})
    if isinstance(answer, Conflict):
        raise HTTPException(
            409,
            detail=f"Idempotency-Key already used for run "
            f"{answer.run_id} with a different request; use a new key",
        )
    if answer.existing:
        response.status_code = 200
    return RunCreated(run_id=answer.run_id, url=f"{API}/runs/{answer.run_id}")


@router.get(f"{API}/runs")
async def list_runs(
    reads: ReadsDep,
    grant: Granted,
    state: RunState | None = None,
    pipeline: Annotated[str | None, Query(max_length=63)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict:
    """Runs of the token's project (an admin's: of all), newest first, filtered by state
    and pipeline name, a page at a time."""
    runs = await reads.runs(state.value if state else None, pipeline, limit, offset, scope(grant))
    return {"runs": [r.model_dump(mode="json") for r in runs], "limit": limit, "offset": offset}


@router.get(f"{API}/runs/{{run_id}}")
async def get_run(reads: ReadsDep, run_id: RunId) -> dict:
    """The run with every step (state, attempts, times, worker, exit code) and attempt."""
    view = await reads.run(run_id)
    if view is None:
        raise not_found(run_id)
    return view.model_dump(mode="json")


@router.get(f"{API}/runs/{{run_id}}/wait", response_model=RunChange)
async def wait(
    master: MasterDep,
    run_id: RunId,
    after: Annotated[str | None, Query(pattern=POSITION, max_length=64)] = None,
    timeout_s: Annotated[float, Query(ge=0, le=RUN_WAIT_S)] = RUN_WAIT_S,
    until_end: bool = False,
):
    """A long poll: answers once the run has changed since `after` (the `position` of an
    earlier answer) or has ended (with `until_end=true`: only once it has ended), or after
    `timeout_s`; without `after`, at once. Follow a run with it: wait, read the run, wait
    from the position, read again."""
    change = await master.wait(run_id, after, timeout_s, until_end)
    if change is None:
        raise HTTPException(404, detail=f"run {run_id!r} not found")
    return change


@router.post(f"{API}/runs/{{run_id}}/cancel", dependencies=[needs(Role.SUBMIT)])
async def cancel(master: MasterDep, run_id: RunId, grant: Granted) -> dict:
    """Cancel: queued steps at once, running steps' process groups killed. Idempotent."""
    state = await master.cancel(run_id, caller(grant))
    if state is None:
        raise HTTPException(404, detail=f"run {run_id!r} not found")
    return {"run_id": run_id, "state": state}


@router.get(
    f"{API}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def events(
    master: MasterDep,
    grant: Granted,
    run_id: Annotated[str | None, Query(pattern=RUN_ID, max_length=64)] = None,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
):
    """Run and step state changes of the token's project's runs (an admin's: of all) as
    Server-Sent Events (`event: run` or `step`, `data:` JSON), from now on, or after
    `Last-Event-ID` when a client reconnects. `run_id` keeps one run's. An `event: reset`
    says changes were missed (reload what you show)."""
    epoch, after = parse_position(last_event_id)
    return StreamingResponse(
        _event_stream(master, run_id, scope(grant), epoch, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _unpacked(req: SubmitRequest, limit: int) -> tuple[str | dict[str, Any], bytes | None]:
    """The request's pipeline (with a git source put in it) and its archive, checked."""
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
    return req.pipeline, data


async def _stored(reads: ApiReads, archive: bytes) -> SourceRef:
    """The checked archive put in the artifact store the master names (the master handles its
    digest only; the workers fetch it from there)."""
    blobs = await reads.artifacts()
    digest = await asyncio.to_thread(blobs.put, io.BytesIO(archive))
    return SourceRef(digest=digest, size=len(archive))


def _rejected(problems: list[str]) -> JSONResponse:
    return JSONResponse({"detail": "; ".join(problems), "problems": problems}, status_code=422)


def _scoped_key(key: str | None, authorization: str | None) -> str | None:
    """An Idempotency-Key as the token's own: two tokens using one key do not meet."""
    if not key:
        return None
    token = (authorization or "").partition(" ")[2].strip()
    return hashlib.sha256(f"{tokens.digest(token)}:{key}".encode()).hexdigest()


def _check(pipeline: str | dict[str, Any], env: dict[str, str], limit: int) -> list[str]:
    """The problems this replica can see without the master (which also checks pools)."""
    try:
        parse_pipeline(pipeline, max_bytes=limit, measure_objects=True)
    except SpecError as e:
        return e.problems
    return check_env_overrides(env)


def _with_git_source(
    pipeline: str | dict[str, Any], git: GitSource, limit: int
) -> str | dict[str, Any]:
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


async def _event_stream(
    master: MasterLink, run_id: str | None, project: str | None, epoch: float | None, after: int
) -> AsyncIterator[bytes]:
    yield b"retry: 2000\n\n"
    while True:
        try:
            # A new client only learns where "now" is: no waiting, nothing sent.
            answer = await master.events(max(after, 0), epoch, 0.0 if after < 0 else EVENT_WAIT_S)
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
                project is None or event.get("project", "default") == project
            ):
                yield (
                    f"id: {epoch}:{after}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n"
                ).encode()
        if not events:
            yield b": keep-alive\n\n"
