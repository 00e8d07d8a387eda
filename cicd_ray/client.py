"""The Python client of the HTTP API.

    from cicd_ray import Client
    run = Client().submit("pipelines/hello.yaml")   # CICD_RAY_URL, CICD_RAY_TOKEN
    run.wait()
    print(run.state, run.logs("build"))

HTTP errors become the project's exceptions with the server's message: 401 Unauthorized,
404 NotFound, 422 SpecError (with the problems), 503 MasterUnavailable, others ApiError (403
for a token whose role does not allow it, 429 for a project at its quota).
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from cicd_ray.config import Settings
from cicd_ray.errors import (
    ApiError,
    CicdError,
    MasterUnavailable,
    NotFound,
    SpecError,
    Unauthorized,
)
from cicd_ray.follow import follow
from cicd_ray.names import API
from cicd_ray.pipeline.load import load_pipeline
from cicd_ray.pipeline.model import PipelineSpec
from cicd_ray.protocol import LogSlice, RunChange
from cicd_ray.source import SOURCE_LIMIT_BYTES, snapshot, source_folder


class Client:
    """The Python client of the HTTP API: submit pipelines (with a source folder, an archive or a
    repository), follow runs, read logs and artifacts, cancel, re-run, approve. `url` and `token`
    default to CICD_RAY_URL and CICD_RAY_TOKEN."""

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout_s: float = 60.0
    ) -> None:
        if not url or not token:
            settings = Settings.from_env()
            url, token = url or settings.url, token or settings.token
        if not url:
            raise CicdError("no API URL: pass url= or set CICD_RAY_URL (cicd-ray up prints it)")
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout_s, headers={"Authorization": f"Bearer {token}"}
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise MasterUnavailable(f"{self.url} did not answer: {e}") from None
        _raise_for(response)
        return response

    def health(self) -> dict:
        response = self._http.get("/healthz")
        return response.json()

    def submit(
        self,
        pipeline: str | Path | dict,
        source: str | Path | None = None,
        env: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        secrets: dict[str, str] | None = None,
        project: str | None = None,
        loaded: PipelineSpec | None = None,
    ) -> Run:
        """Submit a pipeline: a file path, YAML text or a mapping. A file's `source:` folder
        (or `source`, given here) is packed and uploaded. Retries of this call with the same
        `idempotency_key` return the same run. `secrets`: the run's own, given to the steps
        that list them, masked in logs, deleted when the run ends. `project`: whose run it is
        (the token's project by default; only an admin's token may name another). `loaded`:
        the file's pipeline, when the caller has loaded it already (it is not parsed again)."""
        body: dict[str, Any] = {"env": env or {}}
        if secrets:
            body["secrets"] = secrets
        if project:
            body["project"] = project
        folder = None
        if isinstance(pipeline, Path) or (isinstance(pipeline, str) and _names_a_file(pipeline)):
            path = Path(pipeline)
            spec = loaded or load_pipeline(path)
            body["pipeline"] = path.read_text(encoding="utf-8")
            folder = source_folder(spec.source, path.resolve().parent, source)
        else:
            body["pipeline"] = pipeline
            folder = Path(source) if source is not None else None
        if folder is not None:
            _, data = snapshot(folder, SOURCE_LIMIT_BYTES)
            body["source"] = {"archive": base64.b64encode(data).decode()}
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        answer = self._request("POST", f"{API}/runs", json=body, headers=headers).json()
        return self.run(answer["run_id"])

    def run(self, run_id: str) -> Run:
        return Run(self, self._request("GET", f"{API}/runs/{run_id}").json())

    def list_runs(
        self,
        state: str | None = None,
        pipeline: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[dict]:
        params = {
            k: v
            for k, v in {
                "state": state,
                "pipeline": pipeline,
                "limit": limit,
                "offset": offset,
            }.items()
            if v is not None
        }
        return self._request("GET", f"{API}/runs", params=params).json()["runs"]

    def workers(self, since: float | None = None) -> list[dict]:
        params = {"since": since} if since is not None else None
        return self._request("GET", f"{API}/workers", params=params).json()["workers"]

    def queue(self) -> dict:
        return self._request("GET", f"{API}/queue").json()["pools"]

    def schedules(self) -> list[dict]:
        """The token's project's schedules, with their next and last slots."""
        return self._request("GET", f"{API}/schedules").json()["schedules"]

    def add_schedule(
        self, name: str, cron: str, pipeline: str | dict | None = None, **options: Any
    ) -> dict:
        """A schedule: a `pipeline` of its own (YAML text or a mapping) or, with
        `repository=`, a repository's pipeline file at `ref=`; also `timezone=`, `env=`,
        `missed=` ("latest" or "skip")."""
        body = {"name": name, "cron": cron, **options}
        if pipeline is not None:
            body["pipeline"] = pipeline
        return self._request("POST", f"{API}/schedules", json=body).json()

    def delete_schedule(self, name: str) -> None:
        self._request("DELETE", f"{API}/schedules/{name}")

    def audit(self, limit: int = 100, offset: int = 0) -> list[dict]:
        """Who submitted, cancelled, re-ran, approved or rejected what (admin tokens)."""
        params = {"limit": limit, "offset": offset}
        return self._request("GET", f"{API}/audit", params=params).json()["audit"]

    def cancel(self, run_id: str) -> str:
        return self._request("POST", f"{API}/runs/{run_id}/cancel").json()["state"]

    def wait(
        self,
        run_id: str,
        after: str | None = None,
        timeout_s: float = 30.0,
        until_end: bool = False,
    ) -> RunChange:
        """The long poll: once the run changed since `after` (a position from an earlier
        answer) or ended (with `until_end`: once it ended), or after `timeout_s`; without
        `after`, at once."""
        params = {
            "timeout_s": timeout_s,
            **({"after": after} if after else {}),
            **({"until_end": "true"} if until_end else {}),
        }
        return RunChange.model_validate(
            self._request(
                "GET",
                f"{API}/runs/{run_id}/wait",
                params=params,
                timeout=self._http.timeout.read + timeout_s,
            ).json()
        )

    def log(self, run_id: str, step: str, attempt: int | None = None, offset: int = 0) -> str:
        return self.log_slice(run_id, step, attempt, offset).data.decode(errors="replace")

    def log_slice(
        self, run_id: str, step: str, attempt: int | None = None, offset: int = 0
    ) -> LogSlice:
        """The log from `offset`, with the attempt, its state and whether more can come (the
        response's X-Attempt, X-Attempt-State and X-More headers)."""
        params = {"offset": offset, **({"attempt": attempt} if attempt else {})}
        response = self._request("GET", f"{API}/runs/{run_id}/steps/{step}/log", params=params)
        number = response.headers.get("x-attempt")
        return LogSlice(
            attempt=int(number) if number else None,
            state=response.headers.get("x-attempt-state", "queued"),
            data=response.content,
            more=response.headers.get("x-more") == "true",
        )

    def artifacts(self, run_id: str, step: str | None = None) -> list[dict]:
        """The files a run's steps kept: step, path, size, digest, url."""
        params = {"step": step} if step else None
        return self._request("GET", f"{API}/runs/{run_id}/artifacts", params=params).json()[
            "artifacts"
        ]

    def download(self, run_id: str, step: str, path: str, dest: str | Path) -> Path:
        """Save one artifact to `dest` (streamed), checking its SHA-256."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        try:
            with self._http.stream(
                "GET", f"{API}/runs/{run_id}/artifacts/{step}/{path}", timeout=None
            ) as response:
                if response.is_error:
                    response.read()
                    _raise_for(response)
                with dest.open("wb") as out:
                    for chunk in response.iter_bytes():
                        digest.update(chunk)
                        out.write(chunk)
        except httpx.HTTPError as e:
            raise MasterUnavailable(f"{self.url} stopped streaming: {e}") from None
        if digest.hexdigest() != response.headers.get("x-artifact-sha256"):
            dest.unlink(missing_ok=True)
            raise ApiError(502, f"{path}: the download does not match its digest")
        return dest

    def explain(self, run_id: str, step: str) -> dict:
        """Why a step ran instead of being reused (see `cicd-ray explain`)."""
        return self._request("GET", f"{API}/runs/{run_id}/steps/{step}/explain").json()

    def rerun(self, run_id: str, only_failed: bool = False) -> Run:
        """A new run of a finished one; with `only_failed`, of its failed part."""
        answer = self._request(
            "POST", f"{API}/runs/{run_id}/rerun", json={"only_failed": only_failed}
        ).json()
        return self.run(answer["run_id"])

    def approve(
        self,
        run_id: str,
        step: str,
        approved: bool = True,
        by: str | None = None,
        comment: str = "",
    ) -> dict:
        """Release (or reject) a step waiting for approval: {run_id, step, state, decision}.
        `by`: who answers (default: the token's id)."""
        body = {"reject": not approved, "comment": comment, **({"by": by} if by else {})}
        return self._request("POST", f"{API}/runs/{run_id}/steps/{step}/approve", json=body).json()

    def follow_log(self, run_id: str, step: str, attempt: int | None = None) -> Iterator[str]:
        """Yield the log as it is written until the attempt ends."""
        params = {"follow": "true", **({"attempt": attempt} if attempt else {})}
        try:
            with self._http.stream(
                "GET", f"{API}/runs/{run_id}/steps/{step}/log", params=params, timeout=None
            ) as response:
                if response.is_error:
                    response.read()
                    _raise_for(response)
                yield from response.iter_text()
        except httpx.HTTPError as e:
            raise MasterUnavailable(f"{self.url} stopped streaming: {e}") from None


class Run:
    """A run as the API last showed it; `refresh()` asks again."""

    def __init__(self, client: Client, view: dict) -> None:
        self.client = client
        self.view = view

    @property
    def id(self) -> str:
        return self.view["run"]["id"]

    @property
    def state(self) -> str:
        return self.view["run"]["state"]

    @property
    def steps(self) -> list[dict]:
        return self.view["steps"]

    def refresh(self) -> Run:
        self.view = self.client.run(self.id).view
        return self

    def wait(self, timeout: float | None = None) -> Run:
        """Until the run ends (TimeoutError past `timeout` seconds), by the server's long poll."""
        self.view = follow(
            lambda run_id: self.client.run(run_id).view,
            self.client.wait,
            self.id,
            lambda view: view["run"]["state"],
            timeout_s=timeout,
        )
        return self

    def logs(self, step: str, follow: bool = False, attempt: int | None = None):
        """The step's log as text; with follow=True an iterator of text as it arrives."""
        if follow:
            return self.client.follow_log(self.id, step, attempt)
        return self.client.log(self.id, step, attempt)

    def cancel(self) -> str:
        return self.client.cancel(self.id)

    def __repr__(self) -> str:
        return f"Run({self.id!r}, state={self.state!r})"


def _names_a_file(text: str) -> bool:
    """Whether a string given as the pipeline is a file's path rather than YAML text (a long
    one-line text is too long a name for the file system to answer)."""
    if "\n" in text:
        return False
    try:
        return Path(text).is_file()
    except OSError:
        return False


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text}
    detail = body.get("detail")
    if not isinstance(detail, str):
        detail = yaml.safe_dump(detail, default_flow_style=True).strip()
    status = response.status_code
    if status == 401:
        raise Unauthorized(detail)
    if status == 404:
        raise NotFound(detail)
    if status == 422 and "problems" in body:
        raise SpecError(body["problems"])
    if status == 503:
        raise MasterUnavailable(detail)
    raise ApiError(status, detail)
