"""Flow control on the session's real cluster: conditions, a cancelled run's cleanup,
concurrency groups in submission order, approvals over HTTP, and a notification received by a
real HTTP server, signed, delivered once across a master SIGKILL."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from cicd_ray.notify.webhooks import project_key, verify
from cicd_ray.states import StepState
from tests.integration.conftest import API_TOKEN, WEBHOOK_SECRET
from tests.integration.test_builds import shared_file


def test_a_failing_run_runs_its_always_cleanup_and_skips_by_condition(harness, shared_dir):
    evidence = shared_file(shared_dir / "evidence")
    view = harness.run(
        {
            "name": "flow-fail",
            "steps": [
                {"name": "test", "run": "echo testing; exit 1"},
                {"name": "deploy", "needs": ["test"], "run": f"echo deploy >> {evidence}"},
                {
                    "name": "cleanup",
                    "needs": ["test"],
                    "if": "always()",
                    "run": f"echo cleanup >> {evidence}",
                },
                {
                    "name": "on-main",
                    "if": "run.branch == 'main'",
                    "run": f"echo main >> {evidence}",
                },
            ],
        }
    )
    assert view["run"]["state"] == "failed" and view["run"]["reason"] == "failed steps: test"
    assert evidence.read_text() == "cleanup\n"  # deploy skipped; not on a branch at all
    on_main = harness.step(view, "on-main")
    assert on_main["state"] == "skipped" and on_main["skipped_by_condition"]
    assert on_main["reason"] == "if: run.branch == 'main' was false"
    assert harness.step(view, "deploy")["reason"] == "needs test (failed)"


def test_a_branch_condition_runs_on_main_and_skips_on_another_branch(harness, tmp_path):
    from tests.builders import make_repo
    from tests.integration.test_builds import git

    url = make_repo(tmp_path)
    git("push", "-q", url, "main:feature", cwd=tmp_path / "work")
    pipeline = {
        "name": "flow-branch",
        "steps": [
            {"name": "build", "run": "echo built"},
            {
                "name": "deploy",
                "needs": ["build"],
                "if": "run.branch == 'main'",
                "run": "echo deploying",
            },
        ],
    }
    for ref, state in (("main", "succeeded"), ("feature", "skipped")):
        view = harness.run({**pipeline, "source": {"git": url, "ref": ref}})
        assert view["run"]["state"] == "succeeded" and view["run"]["branch"] == ref
        assert harness.step(view, "deploy")["state"] == state


def test_a_cancelled_run_still_runs_its_cleanup(harness, shared_dir):
    evidence = shared_file(shared_dir / "evidence")
    run_id = harness.submit(
        {
            "name": "flow-cancel",
            "steps": [
                {"name": "long", "run": "sleep 300"},
                {"name": "after", "needs": ["long"], "run": f"echo after >> {evidence}"},
                {
                    "name": "cleanup",
                    "needs": ["long"],
                    "if": "always()",
                    "timeout": 60,
                    "run": f"echo cleanup cancelled=$CICD_RUN_ID >> {evidence}",
                },
            ],
        }
    )
    harness.wait_for_step(run_id, "long", StepState.RUNNING)
    import ray

    assert ray.get(harness.master.cancel.remote(run_id)) == "running"
    view = harness.wait(run_id)
    assert view["run"]["state"] == "cancelled"
    assert {s["spec"]["name"]: s["state"] for s in view["steps"]} == {
        "long": "cancelled",
        "after": "cancelled",
        "cleanup": "succeeded",
    }
    assert evidence.read_text() == f"cleanup cancelled={run_id}\n"


def test_runs_of_a_group_run_one_at_a_time_in_order_and_a_newer_one_can_cancel(harness, shared_dir):
    evidence = shared_file(shared_dir / "evidence")
    step = {
        "name": "deploy",
        "run": f"echo start $N $(date +%s.%N) >> {evidence}; sleep 0.5; "
        f"echo end $N $(date +%s.%N) >> {evidence}",
    }
    pipeline = {
        "name": "flow-group",
        "env": {"N": "0"},
        "concurrency": {"group": "deploy-${BRANCH}", "limit": 1},
        "steps": [step],
    }
    ids = [harness.submit(pipeline, env={"BRANCH": "main", "N": str(i)}) for i in (1, 2, 3)]
    waiting = harness.view(ids[2])["run"]
    assert waiting["state"] == "queued" and waiting["reason"].startswith(
        "waiting for concurrency group deploy-main ("
    )
    for run_id in ids:
        assert harness.wait(run_id)["run"]["state"] == "succeeded"
    lines = [line.split() for line in evidence.read_text().splitlines()]
    assert [(kind, n) for kind, n, _ in lines] == [
        ("start", "1"),
        ("end", "1"),
        ("start", "2"),
        ("end", "2"),
        ("start", "3"),
        ("end", "3"),
    ]
    times = [float(t) for _, _, t in lines]
    assert times == sorted(times)  # never two at once
    # cancel_in_progress: a newer run of the group replaces the one in progress.
    newer = {
        **pipeline,
        "concurrency": {"group": "deploy-${BRANCH}", "cancel_in_progress": True},
        "steps": [{"name": "deploy", "run": "sleep 300"}],
    }
    old = harness.submit(newer, env={"BRANCH": "main"})
    harness.wait_for_step(old, "deploy", StepState.RUNNING)
    new = harness.submit(
        {**newer, "steps": [{"name": "deploy", "run": "echo new"}]}, env={"BRANCH": "main"}
    )
    ended = harness.wait(old)["run"]
    assert ended["state"] == "cancelled"
    assert ended["reason"] == f"cancelled: run {new} of concurrency group deploy-main replaces it"
    assert harness.wait(new)["run"]["state"] == "succeeded"


@pytest.fixture
def http(api):
    with httpx.Client(
        base_url=api, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=30
    ) as client:
        yield client


def test_an_approval_is_released_over_http_and_another_rejected(harness, http, shared_dir):
    evidence = shared_file(shared_dir / "evidence")
    pipeline = {
        "name": "flow-approve",
        "steps": [
            {"name": "build", "run": "echo built"},
            {
                "name": "production",
                "needs": ["build"],
                "approval": {"prompt": "Deploy?"},
                "run": f"echo deployed $CICD_RUN_ID >> {evidence}",
            },
        ],
    }
    released, rejected = harness.submit(pipeline), harness.submit(pipeline)
    for run_id in (released, rejected):
        step = harness.wait_for_step(run_id, "production", StepState.WAITING_APPROVAL)
        assert step["reason"] == "waiting for approval: Deploy?"
        assert step["worker_id"] is None
    url = f"/api/v1/runs/{released}/steps/production/approve"
    answer = http.post(url, json={"by": "ann", "comment": "release 1.2"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["decision"] == "approved"
    no = http.post(
        f"/api/v1/runs/{rejected}/steps/production/approve",
        json={"reject": True, "by": "bob", "comment": "freeze"},
    )
    assert no.status_code == 200 and no.json()["state"] == "failed"
    done = harness.wait(released)
    assert done["run"]["state"] == "succeeded"
    approval = harness.step(done, "production")["approval"]
    # Issue 24, item 21: who answered is the token; the name typed is kept in the comment.
    token_id = hashlib.sha256(API_TOKEN.encode()).hexdigest()[:12]
    assert (approval["decision"], approval["by"], approval["comment"]) == (
        "approved",
        f"token {token_id}",
        "(ann) release 1.2",
    )
    failed = harness.wait(rejected)
    assert failed["run"]["state"] == "failed"
    assert harness.step(failed, "production")["reason"] == (
        f"rejected by token {token_id}: (bob) freeze"
    )
    assert evidence.read_text() == f"deployed {released}\n"
    again = http.post(url, json={})
    assert again.status_code == 409 and "has ended (succeeded)" in again.json()["detail"]
    assert http.post(f"/api/v1/runs/{released}/steps/nope/approve").status_code == 404
    assert httpx.post(f"{http.base_url}{url}").status_code == 401


class Receiver:
    """A webhook receiver: a real HTTP server on a port chosen before it listens."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.received: list[tuple[dict, bytes]] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def test_a_notification_is_signed_and_delivered_once_across_a_master_sigkill(harness, http):
    from tests.integration.test_faults import sigkill_master

    receiver = Receiver()  # not listening yet: the first tries are refused
    run_id = harness.submit(
        {
            "name": "flow-notify",
            "notify": [{"webhook": f"http://127.0.0.1:{receiver.port}/hook", "when": ["failed"]}],
            "steps": [{"name": "unit", "run": "echo 'AssertionError: 2 != 3'; exit 1"}],
        }
    )
    assert harness.wait(run_id)["run"]["state"] == "failed"
    deadline = time.monotonic() + 30
    while True:  # tried twice, refused, waiting 2 s to try again: the master dies now
        [d] = harness.view(run_id)["deliveries"]
        if d["attempts"] >= 2 and d["state"] == "pending":
            break
        assert time.monotonic() < deadline, d
        time.sleep(0.05)
    sigkill_master(harness)
    receiver.start()
    try:
        deadline = time.monotonic() + 30
        while harness.view(run_id)["deliveries"][0]["state"] != "delivered":
            assert time.monotonic() < deadline, harness.view(run_id)["deliveries"]
            time.sleep(0.1)
        time.sleep(3)  # a second delivery would have come by now
    finally:
        receiver.stop()
    assert len(receiver.received) == 1
    headers, body = receiver.received[0]
    web_key = project_key(WEBHOOK_SECRET, "default")  # the run's project's own key
    assert verify(
        body, web_key, headers["X-Cicd-Signature-256"], headers["X-Cicd-Timestamp"], now=time.time()
    )
    assert not verify(
        body,
        project_key(WEBHOOK_SECRET, "web"),
        headers["X-Cicd-Signature-256"],
        headers["X-Cicd-Timestamp"],
        now=time.time(),
    )
    assert headers["X-Cicd-Delivery"] == f"{run_id}/0"
    doc = json.loads(body)
    assert (doc["run"], doc["pipeline"], doc["state"]) == (run_id, "flow-notify", "failed")
    assert (doc["project"], doc["delivery"]) == ("default", f"{run_id}/0")
    assert doc["failed_steps"][0]["log_tail"] == ["AssertionError: 2 != 3"]
    shown = http.get(f"/api/v1/runs/{run_id}").json()["deliveries"][0]
    assert shown["state"] == "delivered" and shown["status_code"] == 204
    refused = http.post(
        "/api/v1/runs",
        json={
            "pipeline": {
                "name": "flow-notify",
                "notify": [{"webhook": "http://10.0.0.1/hook"}],
                "steps": [{"name": "a", "run": "true"}],
            }
        },
    )
    assert refused.status_code == 422
    assert "notify[0].webhook: 10.0.0.1 is a loopback or private address" in refused.text
