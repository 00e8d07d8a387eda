"""The HTTP route of flow control: a person's answer to a step waiting for approval."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from cicd_ray.api.builds import RunId
from cicd_ray.api.dependencies import Granted, MasterDep, caller, needs
from cicd_ray.names import API
from cicd_ray.protocol import ApproveRequest, Missing, Rejected
from cicd_ray.tokens import Role

router = APIRouter(tags=["flow control"])


@router.post(f"{API}/runs/{{run_id}}/steps/{{step}}/approve", dependencies=[needs(Role.SUBMIT)])
async def approve(
    master: MasterDep, run_id: RunId, step: str, grant: Granted, req: ApproveRequest | None = None
) -> dict:
    """Release (or, with `reject`, reject) a step waiting for approval; who, when and
    why are recorded on the step (`approval`). 409 when the step is not waiting."""
    req = req or ApproveRequest()
    # Who answered is the token, always: a name typed in is the caller's word, not proof.
    by = f"token {grant.token_id}"
    comment = f"({req.by}) {req.comment}".strip() if req.by else req.comment
    answer = await master.approve(run_id, step, not req.reject, by, comment, caller(grant))
    if isinstance(answer, Missing):
        raise HTTPException(404, detail=answer.detail)
    if isinstance(answer, Rejected):
        raise HTTPException(409, detail="; ".join(answer.problems))
    return {
        "run_id": run_id,
        "step": step,
        "state": answer,
        "decision": "rejected" if req.reject else "approved",
    }
