"""Who may do what through the API. The front door (cicd_ray.gate) puts the caller's grant in
the request; a route asks for the role it needs (403 without it); and every route that names
a run (a `{run_id}` in its path) has the run's project checked in one place, a dependency of
every guarded router (`run_scope`), so a route added later is covered too: another project's
run answers 404, as an unknown one does, so a caller does not learn that it exists.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from cicd_ray.auth import Grant, Role
from cicd_ray.names import RUN_ID
from cicd_ray.records import Caller

RUN_ID_TEXT = re.compile(RUN_ID)

WHAT_NEEDS = {Role.SUBMIT: "starting, cancelling, re-running runs and answering approvals",
              Role.ADMIN: "the audit and other projects' runs"}


def grant_of(request: Request) -> Grant:
    return request.state.grant


Granted = Annotated[Grant, Depends(grant_of)]


def needs(role: Role):
    """A route dependency: 403 unless the caller's role allows `role`."""

    def check(grant: Granted) -> Grant:
        if not grant.role.allows(role):
            raise HTTPException(403, detail=f"this token's role is {grant.role.value}: "
                                f"{WHAT_NEEDS[role]} needs role {role.value}")
        return grant

    return Depends(check)


def caller(grant: Grant) -> Caller:
    """The grant as the master records who acted."""
    return Caller(token_id=grant.token_id, project=grant.project,
                  admin=grant.role is Role.ADMIN, api=True)


def scope(grant: Grant) -> str | None:
    """The one project a caller sees (None: all of them)."""
    return None if grant.role is Role.ADMIN else grant.project


def not_found(run_id: str) -> HTTPException:
    return HTTPException(404, detail=f"run {run_id!r} not found")


def run_scope(reads):
    """A dependency of every guarded router: a route whose path names a run answers 404
    unless the caller may see the run (an id that is not one is left to the route's 422)."""

    async def check(request: Request) -> None:
        run_id = request.path_params.get("run_id")
        if run_id is None or not RUN_ID_TEXT.match(run_id):
            return
        project = await reads.call("project_of", run_id)
        if project is None or not request.state.grant.sees(project):
            raise not_found(run_id)

    return Depends(check)


def submit_project(grant: Grant, asked: str | None) -> str:
    """The project a submission's run belongs to: the token's; an admin's may name one."""
    if asked is None or asked == grant.project:
        return grant.project
    if grant.role is not Role.ADMIN:
        raise HTTPException(403, detail=f"this token is project {grant.project}'s: it cannot "
                            f"submit runs of project {asked}")
    return asked
