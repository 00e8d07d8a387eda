"""What the API's routes depend on, by `Depends`: the master's link, the reads and the API's
settings the app holds, and who may do what. The front door (cicd_ray.api.middleware) puts the
caller's grant in the request; a route asks for the role it needs (403 without it); and every
route that names
a run (a `{run_id}` in its path) has the run's project checked in one place, a dependency of
every guarded router (`run_scope`), so a route added later is covered too: another project's
run answers 404, as an unknown one does, so a caller does not learn that it exists.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam

from cicd_ray import tokens
from cicd_ray.api.link import MasterLink
from cicd_ray.api.reads import ApiReads
from cicd_ray.config import Settings
from cicd_ray.names import RUN_ID
from cicd_ray.records import Caller
from cicd_ray.tokens import Grant, Role

RUN_ID_TEXT = re.compile(RUN_ID)

WHAT_NEEDS = {
    Role.SUBMIT: "starting, cancelling, re-running runs and answering approvals",
    Role.ADMIN: "the audit and other projects' runs",
}


def grant_of(request: Request) -> Grant:
    return request.state.grant


Granted = Annotated[Grant, Depends(grant_of)]


def needs(role: Role):
    """A route dependency: 403 unless the caller's role allows `role`."""

    def check(grant: Granted) -> Grant:
        if not grant.role.allows(role):
            raise HTTPException(
                403,
                detail=f"this token's role is {grant.role.value}: "
                f"{WHAT_NEEDS[role]} needs role {role.value}",
            )
        return grant

    return Depends(check)


def caller(grant: Grant) -> Caller:
    """The grant as the master records who acted."""
    return Caller(
        token_id=grant.token_id, project=grant.project, admin=grant.role is Role.ADMIN, api=True
    )


def scope(grant: Grant) -> str | None:
    """The one project a caller sees (None: all of them)."""
    return None if grant.role is Role.ADMIN else grant.project


def not_found(run_id: str) -> HTTPException:
    return HTTPException(404, detail=f"run {run_id!r} not found")


def master_of(request: Request) -> MasterLink:
    return request.app.state.master


def reads_of(request: Request) -> ApiReads:
    return request.app.state.reads


def config_of(request: Request) -> ApiConfig:
    return request.app.state.config


MasterDep = Annotated[MasterLink, Depends(master_of)]
ReadsDep = Annotated[ApiReads, Depends(reads_of)]


async def run_scope(request: Request, reads: ReadsDep) -> None:
    """A dependency of every guarded router: a route whose path names a run answers 404
    unless the caller may see the run (an id that is not one is left to the route's 422)."""
    run_id = request.path_params.get("run_id")
    if run_id is None or not RUN_ID_TEXT.match(run_id):
        return
    project = await reads.project_of(run_id)
    if project is None or not request.state.grant.sees(project):
        raise not_found(run_id)


def submit_project(grant: Grant, asked: str | None) -> str:
    """The project a submission's run belongs to: the token's; an admin's may name one."""
    if asked is None or asked == grant.project:
        return grant.project
    if grant.role is not Role.ADMIN:
        raise HTTPException(
            403,
            detail=f"this token is project {grant.project}'s: it cannot "
            f"submit runs of project {asked}",
        )
    return asked


# A full step name: a base name, then a matrix suffix such as [py=3.11,os=linux].
RunId = Annotated[str, PathParam(pattern=RUN_ID, max_length=64)]


class ApiConfig:
    """The API's settings: given, or read from the environment where the app runs."""

    def __init__(self, grants: list[tokens.Grant] | None, max_body_bytes: int | None) -> None:
        self._book = tokens.TokenBook(grants) if grants is not None else None
        self._limit = max_body_bytes
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    def grants(self) -> list[tokens.Grant]:
        if self._book is None:
            self._book = self.settings.token_book()
        return self._book.grants()

    def max_body_bytes(self) -> int:
        if self._limit is None:
            self._limit = self.settings.max_body_bytes
        return self._limit


ConfigDep = Annotated[ApiConfig, Depends(config_of)]
