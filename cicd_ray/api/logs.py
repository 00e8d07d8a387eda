"""The HTTP route of logs: a step's log as text, from an offset, followed as it grows."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import StreamingResponse

from cicd_ray.api.dependencies import (
    ReadsDep,
    RunId,
)
from cicd_ray.api.reads import ApiReads
from cicd_ray.names import API
from cicd_ray.protocol import (
    LOG_POLL_S,
    LogSlice,
    Missing,
)

STEP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}(\[[A-Za-z0-9_=.,:+@ -]{1,400}\])?$")


router = APIRouter(tags=["runs"])


@router.get(
    f"{API}/runs/{{run_id}}/steps/{{step}}/log",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/plain": {}}}},
)
async def step_log(
    reads: ReadsDep,
    run_id: RunId,
    step: str,
    follow: bool = False,
    offset: Annotated[int, Query(ge=0)] = 0,
    attempt: Annotated[int | None, Query(ge=1)] = None,
):
    """A step's log as text (its last attempt unless `attempt` is given), from byte `offset`.
    With `follow=true` the response streams until the attempt ends. The `X-Attempt` header
    names the attempt (`X-Attempt-State` its state, `X-More` whether its log can still
    grow), so a client that lost the stream resumes with `offset` and it."""
    if not STEP.match(step):
        raise HTTPException(422, detail=f"step {step!r} is not a valid step name")
    first = await reads.step_log(run_id, step, attempt, offset)
    if isinstance(first, Missing):
        raise HTTPException(404, detail=first.detail)
    headers = {
        "X-Attempt": str(first.attempt or ""),
        "X-Attempt-State": first.state,
        "X-More": "true" if first.more else "false",
        "Cache-Control": "no-store",
    }
    if not follow:
        return Response(first.data, media_type="text/plain; charset=utf-8", headers=headers)
    return StreamingResponse(
        _follow(reads, run_id, step, attempt, offset, first),
        media_type="text/plain; charset=utf-8",
        headers=headers,
    )


async def _follow(
    reads: ApiReads, run_id: str, step: str, attempt: int | None, offset: int, answer: LogSlice
) -> AsyncIterator[bytes]:
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
            answer = await reads.step_log(run_id, step, pinned, offset)
        except HTTPException:
            return  # the master went away mid-stream: the client resumes from its offset
        if isinstance(answer, Missing):
            return
        if pinned is None and answer.attempt is not None:
            pinned = answer.attempt
