"""Git webhooks through the real API: a signed push to the repository's webhook runs the
pipeline file of that commit (not of the branch's head), with CICD_BRANCH, CICD_COMMIT and
CICD_EVENT; the host's status API (a local HTTP server standing in for it) is told pending,
then success; a redelivery starts nothing new; a bad or missing signature is 401 and starts
nothing; other events and other branches are 202."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.integration.conftest import API_TOKEN, HOOK_SECRET, STATUS_TOKEN

PIPELINE = """\
name: web-app
steps:
  - name: build
    run: |
      echo "branch=$CICD_BRANCH commit=$CICD_COMMIT event=$CICD_EVENT"
      cat version.txt
"""


class StatusApi:
    """The host's status API: records each POST (path, headers, JSON body)."""

    def __init__(self, port: int) -> None:
        calls = self.calls = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                calls.append((self.path, dict(self.headers), json.loads(body)))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def repo(harness, tmp_path):
    """acme/web-app with two commits on main: (first, second)."""
    bare = harness.git_host.bare
    work = tmp_path / "work"
    work.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=work,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    git("init", "-q", "-b", "main")
    (work / ".cicd-ray.yaml").write_text(PIPELINE)
    shas = []
    for version in ("one", "two"):
        (work / "version.txt").write_text(f"version {version}\n")
        git("add", ".")
        git("commit", "-qm", version)
        shas.append(git("rev-parse", "HEAD").strip())
    if not bare.exists():
        subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    git("push", "-q", "--force", f"file://{bare}", "main")
    return shas


@pytest.fixture
def status_api(harness):
    api = StatusApi(harness.git_host.status_port)
    yield api
    api.close()


def delivery(
    event: str, payload: dict, secret: str | None = HOOK_SECRET, delivery_id: str | None = None
) -> tuple[bytes, dict]:
    body = json.dumps(payload).encode()
    headers = {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery_id or str(uuid.uuid4()),
        "Content-Type": "application/json",
    }
    if secret is not None:
        digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        headers["X-Hub-Signature-256"] = f"sha256={digest}"
    return body, headers


def push(sha: str, branch: str = "main") -> dict:
    return {
        "ref": f"refs/heads/{branch}",
        "after": sha,
        "repository": {
            "full_name": "acme/web-app",
            "clone_url": "https://github.com/acme/web-app.git",
        },
    }


def test_a_signed_push_runs_the_pipeline_of_its_commit_and_reports_its_status(
    api, repo, status_api, cli
):
    stale, head = repo  # main is at the second commit: the one a push builds
    hook = f"{api}/api/v1/hooks/github/acme/web-app"
    with httpx.Client(headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=30) as admin:
        before = len(
            admin.get(f"{api}/api/v1/runs", params={"pipeline": "web-app", "limit": 500}).json()[
                "runs"
            ]
        )
        body, headers = delivery("push", push(stale))  # overtaken, or a replay: ignored
        ignored = httpx.post(hook, content=body, headers=headers, timeout=60)
        assert ignored.status_code == 202, ignored.text
        assert "no longer the head of branch main" in ignored.json()["ignored"]
        body, headers = delivery("push", push(head))
        started = httpx.post(hook, content=body, headers=headers, timeout=60)
        assert started.status_code == 201, started.text
        run_id = started.json()["run_id"]
        again = httpx.post(hook, content=body, headers=headers, timeout=60)  # a redelivery
        assert again.status_code == 200 and again.json()["run_id"] == run_id
        # The captured body replayed with a new delivery id (signature intact): the same run.
        replayed = {**headers, "X-GitHub-Delivery": str(uuid.uuid4())}
        again = httpx.post(hook, content=body, headers=replayed, timeout=60)
        assert again.status_code == 200 and again.json()["run_id"] == run_id
        deadline = time.monotonic() + 90
        while (view := admin.get(f"{api}/api/v1/runs/{run_id}").json())["run"]["state"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        log = admin.get(f"{api}/api/v1/runs/{run_id}/steps/build/log").text
        runs = admin.get(f"{api}/api/v1/runs", params={"pipeline": "web-app", "limit": 500}).json()[
            "runs"
        ]
    assert view["run"]["state"] == "succeeded", view
    assert (
        view["run"]["commit"],
        view["run"]["branch"],
        view["run"]["event"],
        view["run"]["project"],
    ) == (head, "main", "push", "web")
    assert f"branch=main commit={head} event=push" in log
    assert "version two" in log  # the pushed commit
    assert len(runs) == before + 1  # the redelivery started nothing
    deadline = time.monotonic() + 30
    while len(status_api.calls) < 2:
        assert time.monotonic() < deadline, status_api.calls
        time.sleep(0.1)
    assert [(path, body["state"]) for path, _, body in status_api.calls] == [
        (f"/repos/acme/web-app/statuses/{head}", "pending"),
        (f"/repos/acme/web-app/statuses/{head}", "success"),
    ]
    assert all(h["Authorization"] == f"Bearer {STATUS_TOKEN}" for _, h, _ in status_api.calls)
    assert status_api.calls[1][2]["context"] == "cicd-ray/web-app"
    deadline = time.monotonic() + 30
    while True:  # the second status is recorded delivered once its answer is in
        shown = cli("status", run_id, "--url", api, CICD_RAY_TOKEN=API_TOKEN)
        assert shown.returncode == 0, shown.stderr
        if (
            "commit status success" in shown.stdout
            and ": delivered" in shown.stdout.split("commit status success")[1].splitlines()[0]
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    text = " ".join(shown.stdout.split())
    assert "project web; started by a push to main of acme/web-app" in text
    assert f"commit status pending to http://127.0.0.1:{status_api.server.server_port}" in text
    assert "commit status success to" in text and "delivered after 1 try" in text


def test_bad_or_missing_signatures_start_nothing_and_other_events_are_ignored(api, repo):
    first, _ = repo
    hook = f"{api}/api/v1/hooks/github/acme/web-app"
    with httpx.Client(headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=30) as admin:

        def count() -> int:
            return len(
                admin.get(
                    f"{api}/api/v1/runs", params={"pipeline": "web-app", "limit": 500}
                ).json()["runs"]
            )

        before = count()
        for secret in ("wrong-secret-value", None):
            body, headers = delivery("push", push(first), secret=secret)
            refused = httpx.post(hook, content=body, headers=headers, timeout=30)
            assert refused.status_code == 401, refused.text
        body, headers = delivery("push", push(first))
        tampered = httpx.post(hook, content=body.replace(b"main", b"mainx"), headers=headers)
        assert tampered.status_code == 401
        for event, payload, why in [
            ("ping", {"zen": "hi", "repository": {"full_name": "acme/web-app"}}, "event 'ping'"),
            ("push", push(first, "feature/x"), "branch feature/x is not one of main, release/*"),
        ]:
            body, headers = delivery(event, payload)
            ignored = httpx.post(hook, content=body, headers=headers, timeout=30)
            assert ignored.status_code == 202 and ignored.json() == {"ignored": why}
        body, headers = delivery(
            "push", {**push(first), "repository": {"full_name": "acme/other"}}
        )  # signed by web-app's secret, of another repository
        assert httpx.post(hook, content=body, headers=headers).status_code == 400
        other = httpx.post(f"{api}/api/v1/hooks/github/acme/other", content=body, headers=headers)
        assert other.status_code == 401 and "acme/other" not in other.text  # not told
        # An unsigned body nested past any parser's depth: refused by its signature, unparsed
        # (the 20 MB one: tests/unit/test_hooks.py; this API takes 1 MiB bodies).
        refused = httpx.post(hook, content=b"[" * 100_000, headers={"X-GitHub-Event": "push"})
        assert refused.status_code == 401
        assert count() == before
