"""The HTTP API under a real Ray Serve deployment, through httpx and the Python client."""

from __future__ import annotations

import base64
import io
import subprocess
import tarfile
import time

import httpx
import pytest

from cicd_ray.client import Client
from cicd_ray.errors import ApiError, MasterUnavailable, NotFound, SpecError, Unauthorized
from cicd_ray.protocol import LogSlice
from tests.integration.conftest import API_BODY_LIMIT, API_TOKEN, OTHER_TOKEN
from tests.waiting import all_gone, pids_in, wait_until

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture
def client(api):
    with Client(api, API_TOKEN) as c:
        yield c


def test_healthz_needs_no_token(api):
    r = httpx.get(f"{api}/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and "default" in r.json()["pools"]


@pytest.mark.parametrize(
    "headers, reason",
    [
        ({}, "missing token"),
        ({"Authorization": "Bearer nope"}, "invalid token"),
        ({"Authorization": f"Basic {API_TOKEN}"}, "invalid token"),
    ],
)
def test_every_endpoint_but_healthz_needs_the_token(api, headers, reason):
    for method, path in [
        ("GET", "/api/v1/runs"),
        ("POST", "/api/v1/runs"),
        ("GET", "/api/v1/workers"),
        ("GET", "/api/v1/queue"),
        ("GET", "/api/v1/runs/x"),
        ("POST", "/api/v1/runs/x/cancel"),
    ]:
        r = httpx.request(method, f"{api}{path}", headers=headers, json={})
        assert r.status_code == 401, (method, path)
        assert r.json()["detail"].startswith(reason)
        assert r.headers["www-authenticate"] == "Bearer"


def test_submit_poll_and_read_logs_with_the_client(client):
    run = client.submit("pipelines/hello.yaml")
    assert run.state in ("queued", "running")
    run.wait(timeout=60)
    assert run.state == "succeeded"
    assert {s["spec"]["name"] for s in run.steps} >= {"build", "test[py=3.11]", "package"}
    assert "testing on python 3.11" in run.logs("test[py=3.11]")
    assert run.id in [r["id"] for r in client.list_runs(pipeline="hello")]
    assert [r["state"] for r in client.list_runs(state="succeeded", limit=1)] == ["succeeded"]


def test_follow_a_log_while_the_step_is_still_printing(client):
    run = client.submit(
        {
            "name": "follow",
            "steps": [
                {"name": "talk", "run": "for i in $(seq 1 8); do echo tick $i; sleep 0.3; done"}
            ],
        }
    )
    arrivals = []
    t0 = time.monotonic()
    for text in run.logs("talk", follow=True):
        arrivals.append((time.monotonic() - t0, text))
    full = "".join(t for _, t in arrivals)
    assert full.splitlines() == [f"tick {i}" for i in range(1, 9)]
    assert len(arrivals) >= 3 and arrivals[0][0] < arrivals[-1][0] - 1.0
    assert client.run(run.id).wait(timeout=30).state == "succeeded"


def test_each_attempt_s_log_by_its_number(client, api):
    run = client.submit(
        {
            "name": "attempts",
            "steps": [
                {
                    "name": "flaky",
                    "retry": {"max": 2, "on": ["failure"]},
                    "run": 'echo "try $CICD_ATTEMPT"; [ "$CICD_ATTEMPT" -ge 2 ]',
                }
            ],
        }
    )
    assert run.wait(timeout=30).state == "succeeded"
    url = f"{api}/api/v1/runs/{run.id}/steps/flaky/log"
    for attempt, text in [(1, "try 1\n"), (2, "try 2\n"), (None, "try 2\n")]:
        r = httpx.get(url, params={"attempt": attempt} if attempt else {}, headers=AUTH)
        assert (r.status_code, r.text, r.headers["x-attempt"]) == (200, text, str(attempt or 2))
    assert client.log(run.id, "flaky", attempt=1) == "try 1\n"
    assert httpx.get(url, params={"attempt": 3}, headers=AUTH).status_code == 404
    assert httpx.get(url, params={"attempt": 0}, headers=AUTH).status_code == 422


def test_log_resumes_from_an_offset(client):
    run = client.submit({"name": "offset", "steps": [{"name": "s", "run": "echo abcdef"}]})
    run.wait(timeout=30)
    assert client.log(run.id, "s", offset=3) == "def\n"
    headers = client._request("GET", f"/api/v1/runs/{run.id}/steps/s/log").headers
    assert (headers["x-attempt"], headers["x-attempt-state"], headers["x-more"]) == (
        "1",
        "succeeded",
        "false",
    )
    assert client.log_slice(run.id, "s", offset=4) == LogSlice(
        attempt=1, state="succeeded", data=b"ef\n", more=False
    )


def test_the_long_poll_answers_when_the_run_changes(client, shared_dir):
    gate = shared_dir / "long-poll-gate"
    run = client.submit(
        {
            "name": "poll",
            "steps": [{"name": "s", "run": f"while [ ! -e {gate} ]; do sleep 0.05; done"}],
        }
    )
    now = client.wait(run.id)  # without a position: at once, with where "now" is
    wait_until(lambda: client.run(run.id).steps[0]["state"] == "running", what="step runs")
    quiet = client.wait(run.id, now.position, timeout_s=0.5)
    assert quiet.state == "running"
    t0 = time.monotonic()
    idle = client.wait(run.id, quiet.position, timeout_s=1.0)  # nothing changes: the timeout
    assert idle.state == "running" and time.monotonic() - t0 >= 0.9
    gate.touch()
    t0 = time.monotonic()
    ended = client.wait(run.id, idle.position, timeout_s=30)
    assert ended.state == "succeeded" and time.monotonic() - t0 < 10
    r = client._http.get(f"/api/v1/runs/{run.id}/wait", params={"after": "x"})
    assert r.status_code == 422
    r = client._http.get("/api/v1/runs/nope/wait")
    assert r.status_code == 404


def test_cancel_a_running_step_kills_its_processes(client, shared_dir):
    pidfile = shared_dir / "pid"
    run = client.submit(
        {
            "name": "cancel",
            "steps": [{"name": "long", "run": f"sleep 600 & echo $! > {pidfile}; wait"}],
        }
    )
    [pid] = pids_in(pidfile)
    assert run.cancel() == "running"
    assert run.wait(timeout=30).state == "cancelled"
    assert run.cancel() == "cancelled"  # idempotent
    assert all_gone([pid])


def test_idempotent_resubmit_returns_the_same_run(api):
    body = {"pipeline": "name: idem\nsteps:\n  - {name: a, run: 'true'}\n"}
    headers = {**AUTH, "Idempotency-Key": "build-1234"}
    first = httpx.post(f"{api}/api/v1/runs", json=body, headers=headers)
    again = httpx.post(f"{api}/api/v1/runs", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["run_id"] == again.json()["run_id"]
    other = httpx.post(f"{api}/api/v1/runs", json=body, headers={**AUTH, "Idempotency-Key": "2"})
    assert other.status_code == 201 and other.json()["run_id"] != first.json()["run_id"]
    # The same key with another body is a conflict, and stores nothing.
    before = runs_count(api)
    changed = httpx.post(f"{api}/api/v1/runs", json={**body, "env": {"X": "1"}}, headers=headers)
    assert changed.status_code == 409
    assert first.json()["run_id"] in changed.json()["detail"]
    assert runs_count(api) == before
    # Another token's same key is its own key.
    theirs = httpx.post(
        f"{api}/api/v1/runs",
        json=body,
        headers={"Authorization": f"Bearer {OTHER_TOKEN}", "Idempotency-Key": "build-1234"},
    )
    assert theirs.status_code == 201 and theirs.json()["run_id"] != first.json()["run_id"]


def test_archive_upload_is_the_source_of_every_step(client, tmp_path, api):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "app.txt").write_text("from the archive\n")
    run = client.submit(
        {"name": "upload", "steps": [{"name": "s", "run": "cat app.txt"}]}, source=tmp_path / "src"
    )
    assert run.wait(timeout=30).state == "succeeded"
    assert run.logs("s") == "from the archive\n"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    body = {
        "pipeline": {"name": "raw", "steps": [{"name": "s", "run": "cat hello.txt"}]},
        "source": {"archive": base64.b64encode(raw.getvalue()).decode()},
    }
    r = httpx.post(f"{api}/api/v1/runs", json=body, headers=AUTH)
    assert r.status_code == 201
    assert client.run(r.json()["run_id"]).wait(timeout=30).logs("s") == "hi\n"


def test_workers_and_queue(client, harness):
    harness.steady()
    workers = client.workers()
    ready = [w for w in workers if w["state"] == "ready"]
    assert sorted(w["pool"] for w in ready) == ["default", "default", "solo"]
    assert all(w["cpus_in_use"] == 0 and w["last_heartbeat"] for w in ready)
    # `since`: workers that stopped before it are left out; live ones never are.
    live = {w["id"] for w in workers if w["stopped_at"] is None}
    everyone = {w["id"] for w in client.workers(since=0)}
    later = client.workers(since=time.time() + 3600)
    assert {w["id"] for w in later} == live and live <= everyone
    r = httpx.get(f"{client.url}/api/v1/workers", params={"since": "-1"}, headers=AUTH)
    assert r.status_code == 422
    # The `solo` pool's one slot taken: the next two of its steps wait, the oldest first.
    assert client.queue() == {
        "default": {"queued": 0, "oldest_wait_s": 0.0},
        "solo": {"queued": 0, "oldest_wait_s": 0.0},
    }
    run = client.submit(
        {
            "name": "queue",
            "defaults": {"pool": "solo"},
            "steps": [
                {"name": "hold", "run": "sleep 60"},
                {"name": "w1", "run": "true", "priority": -1},
                {"name": "w2", "run": "true", "priority": -1},
            ],
        }
    )
    wait_until(lambda: client.run(run.id).steps[0]["state"] == "running", what="hold runs")
    time.sleep(0.3)  # the two waiting steps have waited at least this long
    queue = client.queue()
    assert queue["default"] == {"queued": 0, "oldest_wait_s": 0.0}
    assert queue["solo"]["queued"] == 2 and 0.3 <= queue["solo"]["oldest_wait_s"] < 30
    run.cancel()
    assert run.wait(timeout=30).state == "cancelled"
    assert client.queue()["solo"] == {"queued": 0, "oldest_wait_s": 0.0}


def runs_count(api) -> int:
    return len(httpx.get(f"{api}/api/v1/runs", params={"limit": 500}, headers=AUTH).json()["runs"])


@pytest.mark.parametrize(
    "body, status, detail",
    [
        ({"pipeline": "name: x\nsteps: [\n"}, 422, "not valid YAML"),
        (
            {"pipeline": {"name": "x", "steps": [{"name": "a", "run": "x", "tiemout": 1}]}},
            422,
            "steps[0] (a).tiemout: unknown key",
        ),
        (
            {"pipeline": {"name": "x", "steps": [{"name": "a", "run": "x", "pool": "gpu"}]}},
            422,
            "steps (a).pool: unknown pool 'gpu'",
        ),
        (
            {"pipeline": "name: x\nsteps: [{name: a, run: x}]", "env": {"CICD_X": "1"}},
            422,
            "env.CICD_X: names starting with CICD_ are reserved",
        ),
        (
            {"pipeline": "name: x\nsteps: [{name: a, run: x}]", "source": {"archive": "@@@"}},
            422,
            "source.archive: not valid base64",
        ),
        ({"pipeline": "name: x\nsteps: [{name: a, run: x}]", "surprise": 1}, 422, "surprise"),
        ({"pipeline": "x" * (API_BODY_LIMIT + 10)}, 413, "byte limit"),
    ],
)
def test_bad_submissions_get_a_4xx_naming_the_problem_and_store_nothing(api, body, status, detail):
    before = runs_count(api)
    r = httpx.post(f"{api}/api/v1/runs", json=body, headers=AUTH)
    assert r.status_code == status
    assert detail in str(r.json()["detail"])
    assert runs_count(api) == before


def test_unknown_run_or_step_and_hostile_paths(api, client):
    assert httpx.get(f"{api}/api/v1/runs/nope", headers=AUTH).status_code == 404
    assert httpx.post(f"{api}/api/v1/runs/nope/cancel", headers=AUTH).status_code == 404
    with pytest.raises(NotFound, match="run 'nope' not found"):
        client.run("nope")
    run = client.submit({"name": "paths", "steps": [{"name": "a", "run": "true"}]})
    run.wait(timeout=30)
    r = httpx.get(f"{api}/api/v1/runs/{run.id}/steps/zzz/log", headers=AUTH)
    assert r.status_code == 404 and "has no step 'zzz'" in r.json()["detail"]
    for hostile in ("..%2F..%2Fetc%2Fpasswd", "a%2F..", "..", "%2e%2e"):
        r = httpx.get(f"{api}/api/v1/runs/{run.id}/steps/{hostile}/log", headers=AUTH)
        assert r.status_code in (404, 422), hostile
    r = httpx.get(f"{api}/api/v1/runs/..%2F..%2Fetc/steps/a/log", headers=AUTH)
    assert r.status_code in (404, 422)


def test_client_errors_are_project_exceptions(api):
    from tests.integration.clusters import free_port

    with pytest.raises(Unauthorized, match="invalid token"), Client(api, "wrong") as c:
        c.list_runs()
    with Client(api, API_TOKEN) as c, pytest.raises(SpecError) as info:
        c.submit({"name": "x", "steps": []})
    assert info.value.problems == ["steps: must list at least one step"]
    with Client(api, API_TOKEN) as c, pytest.raises(ApiError) as info:
        c.submit("x" * (API_BODY_LIMIT + 10))
    assert info.value.status == 413 and "byte limit" in str(info.value)
    nobody = f"http://127.0.0.1:{free_port()}"
    with Client(nobody, API_TOKEN) as c, pytest.raises(MasterUnavailable, match="did not answer"):
        c.list_runs()


def test_git_source_from_a_local_bare_repository(client, api, tmp_path):
    from tests.builders import make_repo

    url = make_repo(tmp_path)
    read = {"name": "read", "run": "cat README; git log --oneline | wc -l"}
    run = client.submit({"name": "git", "source": {"git": url, "ref": "v1"}, "steps": [read]})
    assert run.wait(timeout=60).state == "succeeded"
    assert run.logs("read") == "version one\n1\n"
    body = {
        "pipeline": "name: git2\nsteps:\n  - {name: read, run: cat README}\n",
        "source": {"git": url, "ref": "main"},
    }
    r = httpx.post(f"{api}/api/v1/runs", json=body, headers=AUTH)
    assert r.status_code == 201
    assert client.run(r.json()["run_id"]).wait(timeout=60).logs("read") == "version two\n"
    # The ref is pinned at submission: the run names the commit, and a ref that names none
    # is refused then (422), not a failed step later.
    v1 = subprocess.run(
        ["git", "-C", url.removeprefix("file://"), "rev-parse", "v1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert run.view["run"]["commit"] == v1
    before = runs_count(api)
    bad = httpx.post(
        f"{api}/api/v1/runs",
        headers=AUTH,
        json={
            "pipeline": {
                "name": "git3",
                "source": {"git": url, "ref": "no-such-ref"},
                "steps": [{"name": "read", "run": "true"}],
            }
        },
    )
    assert bad.status_code == 422
    assert "'no-such-ref' names no branch, tag or commit" in bad.text
    assert runs_count(api) == before


def test_hostile_documents_get_a_4xx_within_a_second_while_a_run_goes_on(client, api):
    from tests.builders import HOSTILE

    run = client.submit({"name": "beside", "steps": [{"name": "a", "run": "sleep 2; echo on"}]})
    before = runs_count(api)
    bodies = {
        name: {"pipeline": text}
        for name, (text, _) in HOSTILE.items()
        if len(text) < API_BODY_LIMIT
    }
    deep = '{"pipeline": {"name": "x", "steps": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    for name, body in [*bodies.items(), ("100,000 levels of JSON", deep)]:
        started = time.perf_counter()
        if isinstance(body, str):
            r = httpx.post(
                f"{api}/api/v1/runs",
                content=body,
                timeout=30,
                headers={**AUTH, "Content-Type": "application/json"},
            )
        else:
            r = httpx.post(f"{api}/api/v1/runs", json=body, headers=AUTH, timeout=30)
        elapsed = time.perf_counter() - started
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        assert elapsed < 1.0, (name, elapsed)
    assert runs_count(api) == before
    run.wait(timeout=60)
    assert run.state == "succeeded" and "on" in run.logs("a")


def test_a_3000_step_chain_written_backwards_is_accepted_and_fails_cleanly(client):
    """Each step needs the one after it, and the last one fails: once a 500."""
    from tests.builders import chain

    started = time.perf_counter()
    run = client.submit(chain(3000, reverse=True))
    assert time.perf_counter() - started < 5.0
    run.wait(timeout=120)
    assert run.state == "failed"
    states = {s["spec"]["name"]: s["state"] for s in run.steps}
    assert states["s2999"] == "failed" and states["s0"] == "skipped"
    assert list(states.values()).count("skipped") == 2999
