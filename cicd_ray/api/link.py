"""The master as the API calls it: a typed method per call, so a reader (and an editor) can
follow every call to the actor's method of the same name. How a call travels is the
transport's: on a Serve replica, Ray (cicd_ray.api.serve); with none, every call answers 503.
Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException

from cicd_ray.protocol import LogSlice, Missing, Rejected, Reply, RunChange, RunView, SubmitCommand
from cicd_ray.reads.explain import Explanation
from cicd_ray.records import AuditRecord, Caller, RunRecord
from cicd_ray.triggers.cron import ScheduleSpec
from cicd_ray.triggers.githosts import Trigger

MASTER_TIMEOUT_S = 10.0  # a call the master does not answer in this long is a 503
RETRY_AFTER_S = "2"  # what a 503 tells the client to wait, in seconds
# A transport: (the actor's method, its arguments, how long to wait) -> its answer; it raises
# HTTPException(503) when the master does not answer.
Transport = Callable[[str, tuple, float], Awaitable[Any]]
TRIGGER_TIMEOUT_S = 120.0  # a webhook's run reads the pipeline file from the git host first


async def unlinked(method: str, args: tuple, timeout_s: float) -> Any:
    raise HTTPException(
        503, detail="this API has no master linked", headers={"Retry-After": RETRY_AFTER_S}
    )


class MasterLink:
    """The master's calls, typed; each waits at most MASTER_TIMEOUT_S unless it says more."""

    def __init__(self, transport: Transport = unlinked) -> None:
        self._send = transport

    async def _call(self, method: str, *args: Any, timeout_s: float = MASTER_TIMEOUT_S) -> Any:
        return await self._send(method, args, timeout_s)

    async def ping(self) -> dict:
        return await self._call("ping")

    async def submit(self, command: SubmitCommand) -> Reply:
        return await self._call("submit", command)

    async def wait(
        self, run_id: str, after: str | None, timeout_s: float, until_end: bool
    ) -> RunChange | None:
        return await self._call(
            "wait", run_id, after, timeout_s, until_end, timeout_s=timeout_s + MASTER_TIMEOUT_S
        )

    async def cancel(self, run_id: str, caller: Caller) -> str | None:
        return await self._call("cancel", run_id, caller)

    async def rerun(self, run_id: str, only_failed: bool, caller: Caller) -> Reply | None:
        return await self._call("rerun", run_id, only_failed, caller)

    async def approve(
        self, run_id: str, step: str, approved: bool, by: str, comment: str, caller: Caller
    ) -> str | Rejected | Missing:
        return await self._call("approve", run_id, step, approved, by, comment, caller)

    async def events(self, after: int, epoch: float | None, wait_s: float) -> dict:
        return await self._call("events", after, epoch, wait_s, timeout_s=wait_s + MASTER_TIMEOUT_S)

    async def workers(self, since: float | None, project: str | None) -> list[dict]:
        return await self._call("workers", since, project)

    async def queue(self) -> dict[str, dict]:
        return await self._call("queue")

    async def trigger(self, repo_name: str, trigger: Trigger) -> Reply:
        return await self._call("trigger", repo_name, trigger, timeout_s=TRIGGER_TIMEOUT_S)

    async def schedules(self, project: str | None) -> list[dict]:
        return await self._call("schedules", project)

    async def add_schedule(self, spec: ScheduleSpec, project: str) -> dict | Rejected:
        return await self._call("add_schedule", spec, project)

    async def delete_schedule(self, project: str, name: str) -> bool:
        return await self._call("delete_schedule", project, name)

    # ApiReads, when the store cannot be read from the API's own process (cicd_ray.api.reads).

    async def get_run(self, run_id: str) -> RunView | None:
        return await self._call("get_run", run_id)

    async def list_runs(self, *query: Any) -> list[RunRecord]:
        return await self._call("list_runs", *query)

    async def step_log(
        self, run_id: str, step: str, attempt: int | None, offset: int
    ) -> LogSlice | Missing:
        return await self._call("step_log", run_id, step, attempt, offset)

    async def explain(self, run_id: str, step: str) -> Explanation | Missing:
        return await self._call("explain", run_id, step)

    async def project_of(self, run_id: str) -> str | None:
        return await self._call("project_of", run_id)

    async def audit(self, limit: int, offset: int) -> list[AuditRecord]:
        return await self._call("audit", limit, offset)
