"""The API's reads: answered from the store the master writes, opened on first use; through the
master while the store is unknown or not reachable from here.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException

from cicd_ray.api.dependencies import (
    RETRY_AFTER_S,
)
from cicd_ray.errors import StoreError
from cicd_ray.reads.explain import explain_answer
from cicd_ray.store import (
    Store,
    audit_page,
    log_answer,
    open_reader,
    run_project,
    run_view,
    runs_page,
)
from cicd_ray.store.blobs import ArtifactStore

if TYPE_CHECKING:
    from cicd_ray.api.serve import MasterLink


class Reads:
    """Reads answered from the store the master writes, opened on first use; through the master
    while the store is unknown or not reachable from here (a SQLite file on another node)."""

    def __init__(self, master: MasterLink) -> None:
        self.master = master
        self._store: Store | None = None
        self._artifacts: ArtifactStore | None = None
        self._looked = False

    async def call(self, method: str, *args: Any) -> Any:
        store = await self._open()
        if store is None:
            return await self.master.call(method, *args)
        read = {
            "get_run": run_view,
            "list_runs": runs_page,
            "step_log": log_answer,
            "explain": explain_answer,
            "project_of": run_project,
            "audit": audit_page,
        }[method]
        try:
            return await asyncio.to_thread(read, store, *args)
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
            info = await self.master.call("ping")
            try:
                self._store = await asyncio.to_thread(open_reader, info["store"])
            except StoreError:
                self._store = None
            self._artifacts = await asyncio.to_thread(ArtifactStore, info["artifacts"])
            self._looked = True
        return self._store
