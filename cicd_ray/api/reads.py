"""The API's reads: answered from the store the master writes, opened on first use; through the
master while the store is unknown or not reachable from here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException

from cicd_ray.api.link import RETRY_AFTER_S, MasterLink
from cicd_ray.errors import StoreError
from cicd_ray.protocol import LogSlice, Missing, RunView
from cicd_ray.reads.explain import Explanation, explain_answer
from cicd_ray.reads.runs import audit_page, log_answer, run_project, run_view, runs_page
from cicd_ray.records import AuditRecord, RunRecord
from cicd_ray.store import Store, open_reader
from cicd_ray.store.blobs import ArtifactStore


class ApiReads:
    """The read side (cicd_ray.reads.runs) as the API needs it, off its loop: answered from the
    store the master writes, opened on first use; through the master while the store is unknown
    or not reachable from here (a SQLite file on another node)."""

    def __init__(self, master: MasterLink) -> None:
        self.master = master
        self._store: Store | None = None
        self._artifacts: ArtifactStore | None = None
        self._looked = False

    async def run(self, run_id: str) -> RunView | None:
        """The run with its steps and attempts."""
        return await self._read(run_view, self.master.get_run, run_id)

    async def runs(
        self,
        state: str | None,
        pipeline: str | None,
        limit: int,
        offset: int,
        project: str | None,
    ) -> list[RunRecord]:
        """A page of runs, newest first (of `project`; None: of all)."""
        query = (state, pipeline, limit, offset, project)
        return await self._read(runs_page, self.master.list_runs, *query)

    async def step_log(
        self, run_id: str, step: str, attempt: int | None, offset: int
    ) -> LogSlice | Missing:
        """A step's log from `offset` (its last attempt unless `attempt` is given)."""
        return await self._read(log_answer, self.master.step_log, run_id, step, attempt, offset)

    async def explain(self, run_id: str, step: str) -> Explanation | Missing:
        """Why a step ran instead of being reused."""
        return await self._read(explain_answer, self.master.explain, run_id, step)

    async def project_of(self, run_id: str) -> str | None:
        """The run's project, None for an unknown run."""
        return await self._read(run_project, self.master.project_of, run_id)

    async def audit(self, limit: int, offset: int) -> list[AuditRecord]:
        """A page of the audit trail, newest first."""
        return await self._read(audit_page, self.master.audit, limit, offset)

    async def _read(self, local: Callable[..., Any], remote: Callable[..., Any], *args: Any) -> Any:
        store = await self._open()
        if store is None:
            return await remote(*args)
        try:
            return await asyncio.to_thread(local, store, *args)
        except StoreError as e:
            raise HTTPException(
                503,
                detail=f"the store is not answering: {e}",
                headers={"Retry-After": RETRY_AFTER_S},
            ) from None

    async def artifacts(self) -> ArtifactStore:
        """The artifact store the master names (opened with this replica's credentials)."""
        await self._open()
        return self._artifacts

    async def _open(self) -> Store | None:
        if not self._looked:
            info = await self.master.ping()
            try:
                self._store = await asyncio.to_thread(open_reader, info["store"])
            except StoreError:
                self._store = None
            self._artifacts = await asyncio.to_thread(ArtifactStore, info["artifacts"])
            self._looked = True
        return self._store
