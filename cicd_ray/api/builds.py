"""The HTTP routes of builds: a run's artifacts (listed, downloaded as a stream), why a step
ran instead of being reused, and a re-run of a finished run (or of its failed part)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from cicd_ray.api.dependencies import Granted, MasterDep, ReadsDep, caller, needs, not_found
from cicd_ray.api.reads import ApiReads
from cicd_ray.names import API, RUN_ID
from cicd_ray.protocol import Missing, OverQuota, Rejected, RerunRequest, RunView
from cicd_ray.reads.artifacts import artifact_list
from cicd_ray.store.blobs import CHUNK, ArtifactStore
from cicd_ray.tokens import Role

RunId = Annotated[str, PathParam(pattern=RUN_ID, max_length=64)]


router = APIRouter(tags=["builds"])


async def view_of(reads: ApiReads, run_id: str) -> RunView:
    view = await reads.run(run_id)
    if view is None:
        raise not_found(run_id)
    return view


@router.get(f"{API}/runs/{{run_id}}/artifacts")
async def artifacts(
    reads: ReadsDep, run_id: RunId, step: Annotated[str | None, Query(max_length=500)] = None
) -> dict:
    """The files the run's steps kept (`artifacts:`), or one step's: path, size, SHA-256,
    and the URL to download each (`from_run` names the run that made a reused or carried
    over file)."""
    view = await view_of(reads, run_id)
    if step is not None and step not in {s.name for s in view.steps}:
        raise HTTPException(404, detail=f"run {run_id} has no step {step!r}")
    return {"run_id": run_id, "artifacts": artifact_list(view, step)}


@router.get(
    f"{API}/runs/{{run_id}}/artifacts/{{step}}/{{path:path}}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download(reads: ReadsDep, run_id: RunId, step: str, path: str):
    """One artifact, streamed; `X-Artifact-Sha256` is its digest."""
    view = await view_of(reads, run_id)
    found = next((f for f in artifact_list(view, step) if f["path"] == path), None)
    if found is None:
        raise HTTPException(404, detail=f"step {step!r} of run {run_id} kept no {path!r}")
    store = await reads.artifacts()
    return StreamingResponse(
        _chunks(store, found["digest"]),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(found["size"]),
            "Content-Disposition": disposition(path.rsplit("/", 1)[-1]),
            "X-Artifact-Sha256": found["digest"],
        },
    )


@router.get(f"{API}/runs/{{run_id}}/steps/{{step}}/explain")
async def explain(reads: ReadsDep, run_id: RunId, step: str) -> dict:
    """Why the step ran instead of being reused: the parts of its key (script, env,
    matrix, pool, source, inputs, outputs) that differ from the last success of the same
    step of the same pipeline."""
    answer = await reads.explain(run_id, step)
    if isinstance(answer, Missing):
        raise HTTPException(404, detail=answer.detail)
    return answer.model_dump(mode="json")


@router.post(f"{API}/runs/{{run_id}}/rerun", status_code=201, dependencies=[needs(Role.SUBMIT)])
async def rerun(
    master: MasterDep,
    reads: ReadsDep,
    run_id: RunId,
    grant: Granted,
    req: RerunRequest | None = None,
) -> dict:
    """A new run of a finished run's pipeline on the same commit and inputs, linked to it
    (`rerun_of`); with `only_failed`, its successes are carried over (with their
    artifacts) and only the failed, timed-out, cancelled and skipped steps run, with the
    steps that need them. 409 while the run has not ended."""
    answer = await master.rerun(run_id, bool(req and req.only_failed), caller(grant))
    _refused(answer, run_id)
    return {"run_id": answer.run_id, "url": f"{API}/runs/{answer.run_id}", "rerun_of": run_id}


def _refused(answer, run_id: str) -> None:
    """Raise the HTTP error of a re-run the master did not make."""
    if answer is None:
        raise not_found(run_id)
    if isinstance(answer, Rejected):
        raise HTTPException(409, detail="; ".join(answer.problems))
    if isinstance(answer, OverQuota):
        raise HTTPException(429, detail=answer.detail, headers={"Retry-After": "10"})


def _chunks(store: ArtifactStore, digest: str) -> Iterator[bytes]:
    """A stored file a chunk at a time (Starlette reads a plain iterator in a thread)."""
    with store.open(digest) as src:
        while chunk := src.read(CHUNK):
            yield chunk


def disposition(name: str) -> str:
    """`Content-Disposition` for a kept file of any name (RFC 6266): a plain ASCII fallback
    with no quote, backslash or control character, and the exact name as `filename*`
    (UTF-8, percent-encoded). A name with CR or LF once made the header, and the answer, fail."""
    plain = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='')}"
