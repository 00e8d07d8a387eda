"""Projects through the real API on the session's cluster: a token of one project sees
nothing of another's runs through any route, roles limit what a token may do, a project's
steps get its own secrets, the queued-runs quota is a 429, the audit names who did what, and
a token made with `cicd-ray token create` works at once."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time

import httpx
import pytest

from tests.integration.conftest import (
    API_TOKEN,
    DEPLOY_KEY,
    WEB_DEPLOY_KEY,
    api_tokens_file,
    project_token,
)

OPS_PIPELINE = {
    "name": "ops-build",
    "steps": [
        {"name": "build", "run": "echo ops-secret-output > out.txt", "artifacts": ["out.txt"]},
        {
            "name": "gate",
            "needs": ["build"],
            "approval": {"prompt": "Ship?"},
            "run": "echo shipped",
        },
    ],
}


def client(api: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def submitted(http: httpx.Client, pipeline: dict, **extra) -> str:
    answer = http.post("/api/v1/runs", json={"pipeline": pipeline, **extra})
    assert answer.status_code == 201, answer.text
    return answer.json()["run_id"]


def state_of(http: httpx.Client, run_id: str, step: str | None = None) -> str:
    view = http.get(f"/api/v1/runs/{run_id}").json()
    if step is None:
        return view["run"]["state"]
    return next(s["state"] for s in view["steps"] if s["spec"]["name"] == step)


def until(check, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError("never happened")


def run_routes(api: str) -> list[tuple[str, str]]:
    """(method, path) of every route naming a run, from the API's own OpenAPI document: a
    route added later is covered without editing this test."""
    with client(api, API_TOKEN) as admin:
        paths = admin.get("/openapi.json").json()["paths"]
    return sorted(
        (method.upper(), path)
        for path, methods in paths.items()
        for method in methods
        if "{run_id}" in path
    )


def filled(path: str, run_id: str) -> str:
    return path.replace("{run_id}", run_id).replace("{step}", "build").replace("{path}", "out.txt")


def test_another_project_s_run_is_not_found_through_any_route(api):
    routes = run_routes(api)
    assert len(routes) >= 9, routes  # run, wait, cancel, log, artifacts (2), explain, rerun, ...
    with (
        client(api, project_token("ops-submit")) as ops,
        client(api, project_token("web-submit")) as web,
        client(api, project_token("web-read")) as web_read,
    ):
        run_id = submitted(ops, OPS_PIPELINE)
        until(lambda: state_of(ops, run_id, "gate") == "waiting_approval")
        for method, path in routes:
            for caller in (web, web_read):
                answer = caller.request(method, filled(path, run_id), json={})
                assert answer.status_code in (403, 404), (method, path, answer.text)
                if answer.status_code == 403:  # a read token may not write: said first
                    assert caller is web_read and method == "POST", (method, path)
                else:
                    assert answer.json()["detail"] == f"run {run_id!r} not found", path
            # Its own project's token reaches every one of them (the 404 is the project's).
            if method == "GET":
                assert ops.request(method, filled(path, run_id)).status_code == 200, path
        assert state_of(ops, run_id, "gate") == "waiting_approval"  # nothing was done to it
        assert run_id not in [r["id"] for r in web.get("/api/v1/runs").json()["runs"]]
        assert run_id in [r["id"] for r in ops.get("/api/v1/runs").json()["runs"]]
        approved = ops.post(f"/api/v1/runs/{run_id}/steps/gate/approve", json={})
        assert approved.status_code == 200, approved.text
        until(lambda: state_of(ops, run_id) == "succeeded")
        gate = next(
            s
            for s in ops.get(f"/api/v1/runs/{run_id}").json()["steps"]
            if s["spec"]["name"] == "gate"
        )
    token_id = hashlib.sha256(project_token("ops-submit").encode()).hexdigest()[:12]
    assert gate["approval"]["by"] == f"token {token_id}"  # no name given: the token's id


def test_the_events_stream_and_workers_list_show_only_the_caller_s_project(api):
    seen: list[dict] = []
    web_run: list[str] = []
    done = threading.Event()

    def listen() -> None:
        with (
            client(api, project_token("web-read")) as reader,
            reader.stream("GET", "/api/v1/events", timeout=60) as stream,
        ):
            for line in stream.iter_lines():
                if line.startswith("data: {") and line != "data: {}":
                    seen.append(json.loads(line[6:]))
                    if web_run and any(
                        e["run_id"] == web_run[0]
                        and e["kind"] == "run"
                        and e["state"] == "succeeded"
                        for e in seen
                    ):
                        break
        done.set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(1.5)  # the stream starts from now
    with (
        client(api, project_token("ops-submit")) as ops,
        client(api, project_token("web-submit")) as web,
    ):
        slow = submitted(ops, {"name": "ops-slow", "steps": [{"name": "s", "run": "sleep 4"}]})
        until(lambda: state_of(ops, slow, "s") == "running")

        def running(caller: httpx.Client) -> list[str]:
            workers = caller.get("/api/v1/workers").json()["workers"]
            return [a for w in workers for a in w["running"]]

        assert any(a.startswith(f"{slow}/") for a in running(ops))
        assert not any(a.startswith(f"{slow}/") for a in running(web))
        web_run.append(
            submitted(web, {"name": "web-quick", "steps": [{"name": "q", "run": "echo quick"}]})
        )
        assert done.wait(60), seen
        until(lambda: state_of(ops, slow) == "succeeded")
    assert {e["run_id"] for e in seen} == {web_run[0]}
    assert {e["project"] for e in seen} == {"web"}


def test_roles_limit_what_a_token_may_do(api):
    with (
        client(api, project_token("web-read")) as reader,
        client(api, project_token("web-submit")) as submitter,
        client(api, API_TOKEN) as admin,
    ):
        pipeline = {
            "name": "roles",
            "steps": [{"name": "gate", "approval": {"prompt": "go?"}, "run": "echo ok"}],
        }
        run_id = submitted(submitter, pipeline)
        assert reader.get(f"/api/v1/runs/{run_id}").status_code == 200  # read: sees its own
        for path in (
            "/api/v1/runs",
            f"/api/v1/runs/{run_id}/cancel",
            f"/api/v1/runs/{run_id}/rerun",
            f"/api/v1/runs/{run_id}/steps/gate/approve",
        ):
            answer = reader.post(path, json={"pipeline": pipeline} if path.endswith("runs") else {})
            assert answer.status_code == 403, (path, answer.text)
            assert answer.json()["detail"].startswith("this token's role is read: ")
        assert submitter.get("/api/v1/audit").status_code == 403
        other = submitter.post("/api/v1/runs", json={"pipeline": pipeline, "project": "ops"})
        assert other.status_code == 403
        assert other.json()["detail"] == (
            "this token is project web's: it cannot submit runs of project ops"
        )
        assert submitter.post(f"/api/v1/runs/{run_id}/cancel").status_code == 200
        # An admin's token may submit to any project; the audit names who did what.
        ops_run = submitted(admin, pipeline, project="ops")
        assert admin.post(f"/api/v1/runs/{ops_run}/cancel").status_code == 200
        records = admin.get("/api/v1/audit", params={"limit": 50}).json()["audit"]
    digest = hashlib.sha256(project_token("web-submit").encode()).hexdigest()
    mine = [(r["action"], r["project"], r["run_project"]) for r in records if r["run_id"] == run_id]
    assert mine == [("cancel", "web", "web"), ("submit", "web", "web")]
    assert {r["token_id"] for r in records if r["run_id"] == run_id} == {digest[:12]}
    assert [(r["action"], r["run_project"]) for r in records if r["run_id"] == ops_run] == [
        ("cancel", "ops"),
        ("submit", "ops"),
    ]


def test_a_project_s_steps_get_its_own_secrets(api):
    web_sha = hashlib.sha256(WEB_DEPLOY_KEY.encode()).hexdigest()
    default_sha = hashlib.sha256(DEPLOY_KEY.encode()).hexdigest()
    with client(api, project_token("web-submit")) as web:
        run_id = submitted(
            web,
            {
                "name": "web-secret",
                "steps": [
                    {
                        "name": "s",
                        "secrets": ["DEPLOY_KEY"],
                        "run": 'printf %s "$DEPLOY_KEY" | sha256sum',
                    }
                ],
            },
        )
        until(lambda: state_of(web, run_id) == "succeeded")
        log = web.get(f"/api/v1/runs/{run_id}/steps/s/log").text
    assert web_sha in log and default_sha not in log


def test_a_project_past_its_queued_runs_quota_gets_429_and_nothing_is_stored(api):
    # The first run holds its concurrency group (waiting for an approval, it has started); the
    # second waits for the group, not started: the project's one queued run.
    waiting = {
        "name": "capped",
        "concurrency": {"group": "capped-lock"},
        "steps": [{"name": "gate", "approval": {"prompt": "go?"}, "run": "echo ok"}],
    }
    with client(api, project_token("capped-submit")) as capped:
        holder = submitted(capped, waiting)
        until(lambda: state_of(capped, holder) == "running")
        first = submitted(capped, waiting)
        assert state_of(capped, first) == "queued"
        refused = capped.post("/api/v1/runs", json={"pipeline": waiting})
        assert refused.status_code == 429, refused.text
        assert refused.json()["detail"] == (
            "project capped has 1 queued runs, its quota (max_queued_runs: 1); submit again "
            "once some have started"
        )
        assert [r["id"] for r in capped.get("/api/v1/runs").json()["runs"]] == [first, holder]
        assert capped.post(f"/api/v1/runs/{first}/cancel").status_code == 200
        second = submitted(capped, waiting)  # the quota is free again
        for run_id in (second, holder):
            assert capped.post(f"/api/v1/runs/{run_id}/cancel").status_code == 200


def test_a_token_made_by_the_cli_works_at_once(api, harness, cli):
    done = cli(
        "token",
        "create",
        "--project",
        "web",
        "--role",
        "read",
        "--file",
        str(api_tokens_file(harness)),
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"cicd_[A-Za-z0-9_-]{40,}", token)
    assert "a read token of project web" in done.stdout
    assert hashlib.sha256(token.encode()).hexdigest() in api_tokens_file(harness).read_text()
    with client(api, token) as new:
        assert new.get("/api/v1/runs").status_code == 200
        assert new.post("/api/v1/runs", json={"pipeline": OPS_PIPELINE}).status_code == 403
    bad = cli("token", "create", "--role", "submit", "--file", str(api_tokens_file(harness)))
    assert bad.returncode == 2 and "--role submit needs --project" in bad.stderr + bad.stdout


@pytest.fixture(autouse=True)
def _steady(harness):
    yield
    harness.steady()
