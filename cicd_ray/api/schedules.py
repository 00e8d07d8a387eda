"""The HTTP routes of cron schedules: list them (with their next and last slots), make one,
delete one. A token sees and changes its project's only (another project's: 404)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam

from cicd_ray.api.dependencies import Granted, MasterDep, needs, submit_project
from cicd_ray.names import API
from cicd_ray.protocol import NewSchedule, Rejected
from cicd_ray.tokens import PROJECT_NAME, Role
from cicd_ray.triggers.cron import SCHEDULE_NAME, ScheduleSpec

ProjectQuery = Annotated[str | None, Query(pattern=PROJECT_NAME.pattern)]


router = APIRouter(tags=["schedules"])


@router.get(f"{API}/schedules")
async def schedules(master: MasterDep, grant: Granted) -> dict:
    """The token's project's schedules (an admin's: all), from the repositories file and
    the API: cron, time zone, what each runs, `next_at`, `last_slot`, `last_run`,
    `last_error`."""
    project = None if grant.role is Role.ADMIN else grant.project
    return {"schedules": await master.schedules(project)}


@router.post(f"{API}/schedules", status_code=201, dependencies=[needs(Role.SUBMIT)])
async def add(master: MasterDep, req: NewSchedule, grant: Granted) -> dict:
    """A schedule of the token's project: a `pipeline` of its own, or a `repository`'s
    pipeline file at `ref`; its first slot is the first after now. 422 for an invalid
    one or a name the project uses already."""
    project = submit_project(grant, req.project)
    spec = ScheduleSpec(**req.model_dump(exclude={"project"}))
    answer = await master.add_schedule(spec, project)
    if isinstance(answer, Rejected):
        raise HTTPException(422, detail="; ".join(answer.problems))
    return answer


@router.delete(f"{API}/schedules/{{name}}", dependencies=[needs(Role.SUBMIT)])
async def delete(
    master: MasterDep,
    name: Annotated[str, PathParam(pattern=SCHEDULE_NAME)],
    grant: Granted,
    project: ProjectQuery = None,
) -> dict:
    """Delete a schedule made through the API (those of the repositories file go with
    their lines)."""
    project = submit_project(grant, project)
    if not await master.delete_schedule(project, name):
        raise HTTPException(
            404, detail=f"project {project} has no schedule {name!r} made through the API"
        )
    return {"deleted": name, "project": project}
