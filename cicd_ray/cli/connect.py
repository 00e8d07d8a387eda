"""Where a command gets its answers: the HTTP API, the master over Ray, or the store file; and
following a run to its end through whichever it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from rich.markup import escape

from cicd_ray.cli.root import EXIT_INVALID, err, fail
from cicd_ray.config import Settings
from cicd_ray.errors import CicdError, NotFound
from cicd_ray.follow import follow
from cicd_ray.pipeline.model import PipelineSpec
from cicd_ray.protocol import LogSlice, Missing, Rejected, RunChange, RunView
from cicd_ray.reads.explain import Explanation, explain
from cicd_ray.reads.runs import Reads, run_view, step_log
from cicd_ray.records import RunRecord
from cicd_ray.store import open_store


def warn_python(settings: Settings) -> None:
    """Say it before the first step fails: steps with users of their own cannot run a Python
    under root's home."""
    from cicd_ray.config import parse_uids
    from cicd_ray.worker.isolation import python_warning

    warning = python_warning(parse_uids(settings.step_uids))
    if warning:
        err.print(f"[yellow]warning: {escape(warning)}[/yellow]")


def reader_for(url: str | None) -> Reader:
    return HttpRunner(url) if url else StoreReader(Settings.from_env())


@contextmanager
def connected(url: str | None, address: str | None) -> Iterator[tuple[Runner, bool]]:
    """A runner: the API (--url), a cluster (--address or RAY_ADDRESS), else an embedded local
    Ray that ends with the command; and whether it is embedded."""
    if url:  # no Ray imported for the API
        yield HttpRunner(url), False
        return
    from cicd_ray.cli.connect import RayRunner
    from cicd_ray.cluster import session

    settings = Settings.from_env()
    embedded = session.connect(address, settings)
    if embedded:
        warn_python(settings)
    runner = RayRunner(session.ensure_master(settings), settings)
    try:
        yield runner, embedded
    finally:
        if embedded:
            session.shutdown_embedded(runner.master)


def control(url: str | None, address: str | None, command: str):
    """Where a command that changes runs goes: the API (--url) or a cluster (--address); an
    embedded cluster would end with the command."""
    if not url and not address:
        raise fail(f"{command} needs --url (or CICD_RAY_URL) or --address", EXIT_INVALID)
    return connected(url, address)


class Reader(Protocol):
    def view(self, run_id: str) -> RunView: ...

    def list_runs(self, state: str | None, pipeline: str | None, limit: int) -> list[RunRecord]: ...

    def log(self, run_id: str, step: str, attempt: int | None, offset: int) -> LogSlice:
        """NotFound if the run, step or attempt is unknown."""

    def workers(self, since: float | None = None) -> list[dict]:
        """Live workers and those stopped after `since` (default: lately)."""

    def explain(self, run_id: str, step: str) -> Explanation:
        """NotFound if the run or step is unknown."""

    def fetch(self, run_id: str, artifact: dict, dest: Path) -> None:
        """Save one of `artifact_list`'s files to `dest`."""


class Runner(Reader, Protocol):
    def submit(
        self,
        spec: PipelineSpec,
        path: Path,
        source: Path | None,
        env: dict[str, str],
        secrets: dict[str, str] | None = None,
    ) -> str: ...

    def cancel(self, run_id: str) -> str: ...

    def rerun(self, run_id: str, only_failed: bool) -> str:
        """The new run's id."""

    def approve(self, run_id: str, step: str, approved: bool, by: str, comment: str) -> str:
        """Answer a step waiting for approval; its new state."""

    def wait(
        self, run_id: str, after: str | None, timeout_s: float, until_end: bool = False
    ) -> RunChange:
        """The master's long poll (see cicd_ray.follow)."""


def follow_run(
    runner: Runner, run_id: str, on_update=None, timeout_s: float | None = None
) -> RunView:
    """Follow a run to its end through a runner (see cicd_ray.follow)."""
    return follow(
        runner.view, runner.wait, run_id, lambda v: v.run.state.value, on_update, timeout_s
    )


class StoreReader:
    """The store file itself: works with no cluster, after the runs have ended."""

    def __init__(self, settings: Settings) -> None:
        if settings.store is None and not settings.store_path.exists():
            raise CicdError(
                f"no runs yet: the store {settings.store_path} does not exist (set "
                "CICD_RAY_HOME or CICD_RAY_STORE, or --url for a server)"
            )
        self.store = open_store(settings.store_url)
        self.settings = settings

    def view(self, run_id: str) -> RunView:
        view = run_view(self.store, run_id)
        if view is None:
            raise NotFound(f"run {run_id!r} not found; `cicd-ray runs` lists the runs")
        return view

    def list_runs(self, state: str | None, pipeline: str | None, limit: int) -> list[RunRecord]:
        return Reads(self.store).runs(state, pipeline, limit)

    def log(self, run_id: str, step: str, attempt: int | None, offset: int) -> LogSlice:
        return step_log(self.store, run_id, step, attempt, offset)

    def workers(self, since: float | None = None) -> list[dict]:
        return [
            w.model_dump(mode="json")
            for w in self.store.list_workers()
            if since is None or w.stopped_at is None or w.stopped_at >= since
        ]

    def explain(self, run_id: str, step: str) -> Explanation:
        return explain(self.store, run_id, step)

    def fetch(self, run_id: str, artifact: dict, dest: Path) -> None:
        _fetch(self.settings, artifact, dest)


class RayRunner:
    """The master over Ray: an embedded local cluster, or one joined by address."""

    def __init__(self, master, settings: Settings) -> None:
        from cicd_ray.cluster.session import call

        self.master = master
        self.settings = settings
        self._call = call

    def submit(
        self,
        spec: PipelineSpec,
        path: Path,
        source: Path | None,
        env: dict[str, str],
        secrets: dict[str, str] | None = None,
    ) -> str:
        from cicd_ray.cluster import session

        return session.submit(
            self.master, spec, path.resolve().parent, source, env, self.settings, secrets
        )

    def view(self, run_id: str) -> RunView:
        return _found(self._call(self.master.get_run.remote(run_id)), f"run {run_id!r}")

    def wait(
        self, run_id: str, after: str | None, timeout_s: float, until_end: bool = False
    ) -> RunChange:
        answer = self._call(self.master.wait.remote(run_id, after, timeout_s, until_end))
        return _found(answer, f"run {run_id!r}")

    def cancel(self, run_id: str) -> str:
        return _found(self._call(self.master.cancel.remote(run_id)), f"run {run_id!r}")

    def rerun(self, run_id: str, only_failed: bool) -> str:
        answer = _found(
            self._call(self.master.rerun.remote(run_id, only_failed)), f"run {run_id!r}"
        )
        if isinstance(answer, Rejected):
            raise CicdError("; ".join(answer.problems))
        return answer.run_id

    def approve(self, run_id: str, step: str, approved: bool, by: str, comment: str) -> str:
        answer = _present(
            self._call(self.master.approve.remote(run_id, step, approved, by, comment))
        )
        if isinstance(answer, Rejected):
            raise CicdError("; ".join(answer.problems))
        return answer

    def explain(self, run_id: str, step: str) -> Explanation:
        return _present(self._call(self.master.explain.remote(run_id, step)))

    def fetch(self, run_id: str, artifact: dict, dest: Path) -> None:
        _fetch(self.settings, artifact, dest)

    def list_runs(self, state: str | None, pipeline: str | None, limit: int) -> list[RunRecord]:
        return self._call(self.master.list_runs.remote(state, pipeline, limit, 0))

    def log(self, run_id: str, step: str, attempt: int | None, offset: int) -> LogSlice:
        return _present(self._call(self.master.step_log.remote(run_id, step, attempt, offset)))

    def workers(self, since: float | None = None) -> list[dict]:
        return self._call(self.master.workers.remote(since))


class HttpRunner:
    """The HTTP API through the Python client."""

    def __init__(self, url: str, token: str | None = None) -> None:
        from cicd_ray.client import Client

        self.client = Client(url, token)

    def submit(
        self,
        spec: PipelineSpec,
        path: Path,
        source: Path | None,
        env: dict[str, str],
        secrets: dict[str, str] | None = None,
    ) -> str:
        return self.client.submit(path, source=source, env=env, secrets=secrets, loaded=spec).id

    def view(self, run_id: str) -> RunView:
        return RunView.model_validate(self.client.run(run_id).view)

    def wait(
        self, run_id: str, after: str | None, timeout_s: float, until_end: bool = False
    ) -> RunChange:
        return self.client.wait(run_id, after, timeout_s, until_end)

    def cancel(self, run_id: str) -> str:
        return self.client.cancel(run_id)

    def rerun(self, run_id: str, only_failed: bool) -> str:
        return self.client.rerun(run_id, only_failed).id

    def approve(self, run_id: str, step: str, approved: bool, by: str, comment: str) -> str:
        return self.client.approve(run_id, step, approved, by, comment)["state"]

    def explain(self, run_id: str, step: str) -> Explanation:
        return Explanation.model_validate(self.client.explain(run_id, step))

    def fetch(self, run_id: str, artifact: dict, dest: Path) -> None:
        self.client.download(run_id, artifact["step"], artifact["path"], dest)

    def list_runs(self, state: str | None, pipeline: str | None, limit: int) -> list[RunRecord]:
        runs = self.client.list_runs(state, pipeline, limit)
        return [RunRecord.model_validate(r) for r in runs]

    def log(self, run_id: str, step: str, attempt: int | None, offset: int) -> LogSlice:
        return self.client.log_slice(run_id, step, attempt, offset)

    def workers(self, since: float | None = None) -> list[dict]:
        return self.client.workers(since)


def _fetch(settings: Settings, artifact: dict, dest: Path) -> None:
    """An artifact straight from the artifact store the settings name."""
    from cicd_ray.store.blobs import ArtifactStore

    dest.parent.mkdir(parents=True, exist_ok=True)
    ArtifactStore(settings.artifacts_url).fetch(artifact["digest"], dest)


def _present(answer):
    """The master's answer, or NotFound naming what is missing."""
    if isinstance(answer, Missing):
        raise NotFound(answer.detail)
    return answer


def _found(answer, what: str):
    if answer is None:
        raise NotFound(f"{what} not found")
    return answer
