"""The HTTP routes of the cluster: the workers, the queue, the audit trail."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cicd_ray.api.dependencies import (
    Granted,
    MasterDep,
    ReadsDep,
    needs,
    scope,
)
from cicd_ray.names import API
from cicd_ray.tokens import Role

router = APIRouter(tags=["cluster"])


@router.get(f"{API}/workers")
async def workers(
    master: MasterDep, grant: Granted, since: Annotated[float | None, Query(ge=0)] = None
) -> dict:
    """The live workers and those stopped since `since` (a Unix time; default: the last
    10 minutes): pool, node, state, times, CPUs in use, last heartbeat, CPU and memory,
    and the attempts each runs (of the token's project's runs; an admin's: all)."""
    return {"workers": await master.workers(since, scope(grant))}


@router.get(f"{API}/audit", dependencies=[needs(Role.ADMIN)])
async def audit(
    reads: ReadsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict:
    """Who submitted, cancelled, re-ran, approved or rejected what, newest first: the
    token's id (the start of its digest) and project, the action, the run and its project,
    the step. Admin tokens only."""
    records = await reads.audit(limit, offset)
    return {"audit": [a.model_dump(mode="json") for a in records], "limit": limit, "offset": offset}


@router.get(f"{API}/queue")
async def queue(master: MasterDep) -> dict:
    """Steps ready and waiting for a slot, per pool, and the oldest one's wait."""
    return {"pools": await master.queue()}
