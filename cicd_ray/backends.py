"""Where a CLI command gets its answers: the HTTP API, the master over Ray, or the store file.

All three give the same shapes (a run view is {"run", "steps", "attempts"} as JSON-ready dicts),
so the CLI renders them one way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cicd_ray.config import Settings
from cicd_ray.errors import CicdError, MasterUnavailable, NotFound
from cicd_ray.spec import PipelineSpec
from cicd_ray.states import RunState
from cicd_ray.store import open_store, run_view, step_log

# How long following a run waits for a master that does not answer (a restart takes seconds).
MASTER_OUTAGE_S = 60.0


class Reader(Protocol):
    def view(self, run_id: str) -> dict: ...

    def list_runs(self, state: str | None, pipeline: str | None, limit: int) -> list[dict]: ...

    def log(self, run_id: str, step: str, attempt: int | None, offset: int) -> dict:
        """{"attempt": n, "state": ..., "data": bytes, "more": bool}; NotFound if unknown."""

    def workers(self, since: float | None = None) -> list[dict]:
        """Live workers and those stopped after `since` (default: lately)."""


class Runner(Reader, Protocol):
    def submit(self, spec: PipelineSpec, path: Path, source: Path | None,
               env: dict[str, str]) -> str: ...

    def cancel(self, run_id: str) -> str: ...


def follow(view: Callable[[str], dict], run_id: str,
           on_update: Callable[[dict], None] | None = None, poll_s: float = 0.25,
           timeout_s: float | None = None) -> dict:
    """Poll a run's view until the run ends, calling `on_update` with each; the final view.
    TimeoutError past `timeout_s`. A master that does not answer (it is restarting) is waited
    for up to MASTER_OUTAGE_S at a time: the run goes on without it."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    silent_since: float | None = None
    while True:
        try:
            current = view(run_id)
        except MasterUnavailable:
            now = time.monotonic()
            silent_since = silent_since or now
            if now - silent_since > MASTER_OUTAGE_S or (deadline is not None and now > deadline):
                raise
            time.sleep(poll_s)
            continue
        silent_since = None
        if on_update is not None:
            on_update(current)
        if RunState(current["run"]["state"]).terminal:
            return current
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {current['run']['state']} after "
                               f"{timeout_s} s")
        time.sleep(poll_s)


class StoreReader:
    """The store file itself: works with no cluster, after the runs have ended."""

    def __init__(self, settings: Settings) -> None:
        if settings.store is None and not settings.store_path.exists():
            raise CicdError(f"no runs yet: the store {settings.store_path} does not exist (set "
                            "CICD_RAY_HOME or CICD_RAY_STORE, or --url for a server)")
        self.store = open_store(settings.store_url)

    def view(self, run_id: str) -> dict:
        view = run_view(self.store, run_id)
        if view is None:
            raise NotFound(f"run {run_id!r} not found; `cicd-ray runs` lists the runs")
        return view

    def list_runs(self, state: str | None, pipeline: str | None, limit: int) -> list[dict]:
        return [r.model_dump(mode="json") for r in self.store.list_runs(state, pipeline, limit)]

    def log(self, run_id: str, step: str, attempt: int | None, offset: int) -> dict:
        return step_log(self.store, run_id, step, attempt, offset)

    def workers(self, since: float | None = None) -> list[dict]:
        return [w.model_dump(mode="json") for w in self.store.list_workers()
                if since is None or w.stopped_at is None or w.stopped_at >= since]


class RayRunner:
    """The master over Ray: an embedded local cluster, or one joined by address."""

    def __init__(self, master, settings: Settings) -> None:
        self.master = master
        self.settings = settings

    def submit(self, spec: PipelineSpec, path: Path, source: Path | None,
               env: dict[str, str]) -> str:
        from cicd_ray import cluster

        return cluster.submit(self.master, spec, path.resolve().parent, source, env,
                              self.settings)

    def view(self, run_id: str) -> dict:
        from cicd_ray.cluster import call

        view = call(self.master.get_run.remote(run_id))
        if view is None:
            raise NotFound(f"run {run_id!r} not found")
        return view

    def cancel(self, run_id: str) -> str:
        from cicd_ray.cluster import call

        state = call(self.master.cancel.remote(run_id))
        if state is None:
            raise NotFound(f"run {run_id!r} not found")
        return state

    def list_runs(self, state: str | None, pipeline: str | None, limit: int) -> list[dict]:
        from cicd_ray.cluster import call

        return call(self.master.list_runs.remote(state, pipeline, limit, 0))

    def log(self, run_id: str, step: str, attempt: int | None, offset: int) -> dict:
        from cicd_ray.cluster import call

        answer = call(self.master.step_log.remote(run_id, step, attempt, offset))
        if "error" in answer:
            raise NotFound(answer["error"])
        return answer

    def workers(self, since: float | None = None) -> list[dict]:
        from cicd_ray.cluster import call

        return call(self.master.workers.remote(since))


class HttpRunner:
    """The HTTP API through the Python client."""

    def __init__(self, url: str, token: str | None = None) -> None:
        from cicd_ray.client import Client

        self.client = Client(url, token)

    def submit(self, spec: PipelineSpec, path: Path, source: Path | None,
               env: dict[str, str]) -> str:
        return self.client.submit(path, source=source, env=env).id

    def view(self, run_id: str) -> dict:
        return self.client.run(run_id).view

    def cancel(self, run_id: str) -> str:
        return self.client.cancel(run_id)

    def list_runs(self, state: str | None, pipeline: str | None, limit: int) -> list[dict]:
        return self.client.list_runs(state, pipeline, limit)

    def log(self, run_id: str, step: str, attempt: int | None, offset: int) -> dict:
        response = self.client.log_response(run_id, step, attempt, offset)
        number = response.headers.get("x-attempt")
        return {"attempt": int(number) if number else None,
                "state": response.headers.get("x-attempt-state", "queued"),
                "data": response.content, "more": response.headers.get("x-more") == "true"}

    def workers(self, since: float | None = None) -> list[dict]:
        return self.client.workers(since)

