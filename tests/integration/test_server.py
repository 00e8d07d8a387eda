"""`cicd-ray up`, the CLI against its API, a Ray job submission, and `cicd-ray down`, each as a
user runs them: separate processes on one machine."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from cicd_ray.client import Client
from tests.integration.clusters import BIN, ROOT, free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("up-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "CICD_RAY_"))}
    env.update(
        CICD_RAY_HOME=str(home), PATH=f"{BIN}:{env['PATH']}", CICD_RAY_GIT_ALLOW="file"
    )  # the guide's $REPO is a local repository

    def cli(*args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "cicd-ray"), *args],
            cwd=ROOT,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # Ports of its own: another Ray on this machine holds Ray's defaults (6379, 8265).
    port, ray_port, dashboard_port = free_port(), free_port(), free_port()
    up = (
        "up",
        "--port",
        str(port),
        "--ray-port",
        str(ray_port),
        "--dashboard-port",
        str(dashboard_port),
    )
    started = cli(*up)
    assert started.returncode == 0, started.stdout + started.stderr
    token = re.search(r"export CICD_RAY_TOKEN=(\S+)", started.stdout).group(1)
    address = re.search(r"cicd-ray is up on Ray at (\S+) \(a local head", started.stdout).group(1)
    url = f"http://127.0.0.1:{port}"
    yield {
        "cli": cli,
        "url": url,
        "token": token,
        "out": started.stdout,
        "env": env,
        "home": home,
        "up": up,
        "address": address,
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
    }
    stopped = cli("down", "--address", address)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "the Ray head started by `cicd-ray up`" in stopped.stdout
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=3)
    assert not any(
        f":{ray_port}" in " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["cmdline"])
    ), "the head outlived `down`"


def test_up_prints_the_api_the_dashboard_and_a_token_once(server):
    out = server["out"]
    assert f"API:        {server['url']}" in out and "dashboard:  http://" in out
    assert server["token"].startswith("cicd_")
    tokens = (server["home"] / "tokens").read_text()
    assert server["token"] not in tokens  # only its digest is kept
    r = httpx.get(
        f"{server['url']}/api/v1/runs", headers={"Authorization": f"Bearer {server['token']}"}
    )
    assert r.status_code == 200
    assert httpx.get(f"{server['url']}/api/v1/runs").status_code == 401


def test_up_again_reuses_the_head_and_the_token(server):
    """A second `up` finds the head it started and the token digest it kept: no new head, no
    new token, and the first token still works."""
    again = server["cli"](*server["up"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert (
        f"cicd-ray is up on Ray at {server['address']} (the head an earlier `cicd-ray up` started)"
    ) in again.stdout
    assert "CICD_RAY_TOKEN=<your token>" in again.stdout
    assert "a new API token was created" not in again.stdout
    r = httpx.get(
        f"{server['url']}/api/v1/runs", headers={"Authorization": f"Bearer {server['token']}"}
    )
    assert r.status_code == 200


def test_cli_against_the_server(server):
    cli, url, token = server["cli"], server["url"], server["token"]
    auth = {"CICD_RAY_URL": url, "CICD_RAY_TOKEN": token}
    done = cli("submit", "pipelines/hello.yaml", "--follow", **auth)
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = re.search(r"run (\S+) of hello at ", done.stdout).group(1)
    assert f"run {run_id} succeeded" in done.stdout
    runs = json.loads(cli("runs", "--json", **auth).stdout)
    assert run_id in [r["id"] for r in runs]
    status = json.loads(cli("status", run_id, "--json", **auth).stdout)
    assert {s["state"] for s in status["steps"]} == {"succeeded"}
    log = cli("logs", run_id, "test[py=3.12]", "-f", **auth)
    assert "testing on python 3.12" in log.stdout
    workers = json.loads(cli("workers", "--json", **auth).stdout)
    assert {w["pool"] for w in workers if w["state"] == "ready"} == {"default"}
    # Heartbeats carry the node's network as well as CPU, memory and disk.
    assert all(
        w["net_recv_bytes"] > 0 and w["net_sent_bytes"] > 0
        for w in workers
        if w["state"] == "ready" and w["last_heartbeat"]
    )
    assert "net in/s" in cli("workers", COLUMNS="200", **auth).stdout
    bad = cli("submit", "pipelines/hello.yaml", **{**auth, "CICD_RAY_TOKEN": "wrong"})
    assert bad.returncode == 1 and "invalid token" in bad.stderr

    quick = cli("submit", "pipelines/hello.yaml", **auth)
    assert quick.returncode == 0 and "succeeded" not in quick.stdout
    long = Path(server["home"]) / "long.yaml"
    long.write_text("name: long\nsteps:\n  - {name: wait, run: sleep 612}\n")
    started = cli("submit", str(long), **auth)
    long_id = re.search(r"run (\S+) of long", started.stdout).group(1)
    sleeper = wait_for_process("sleep 612")
    cancelled = cli("cancel", long_id, **auth)
    assert cancelled.returncode == 0 and f"run {long_id}:" in cancelled.stdout
    status = json.loads(cli("status", long_id, "--json", **auth).stdout)
    deadline = time.monotonic() + 30
    while status["run"]["state"] != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.2)
        status = json.loads(cli("status", long_id, "--json", **auth).stdout)
    assert (status["run"]["state"], status["steps"][0]["state"]) == ("cancelled", "cancelled")
    assert psutil.wait_procs([sleeper], timeout=10)[1] == [], "the step's sleep outlived cancel"


def wait_for_process(command: str, timeout_s: float = 30) -> psutil.Process:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in psutil.process_iter(["cmdline"]):
            if " ".join(proc.info["cmdline"] or []) == command:
                return proc
        time.sleep(0.1)
    raise AssertionError(f"no process {command!r} after {timeout_s} s")


def agent_problems() -> str:
    """What the dashboard agents of this session's Ray clusters logged as errors: why a head
    may have no job agent."""
    import os

    folder = Path(os.environ["RAY_TMPDIR"]) / "ray"
    found = []
    for log in sorted(folder.glob("session_*/logs/dashboard_agent.*")):
        lines = log.read_text(errors="replace").splitlines()
        found += [f"{log}: {line}" for line in lines if "ERROR" in line or "rror:" in line]
    return "\n".join(found[-40:])


def test_a_pipeline_submitted_as_a_ray_job(server, tmp_path):
    (tmp_path / "job.yaml").write_text(
        "name: as-job\nsteps:\n  - {name: hi, run: echo from a ray job}\n"
    )
    (tmp_path / "fail.yaml").write_text("name: job-fails\nsteps:\n  - {name: bad, run: exit 3}\n")
    env = {**server["env"], "RAY_AUTH_MODE": "token"}

    def job(pipeline: str) -> subprocess.CompletedProcess:
        # Ray's job agent on a new head can take a while to come up on a busy machine; Ray
        # answers "No available agent ... try again later" until it has.
        deadline = time.monotonic() + 120
        while True:
            done = subprocess.run(
                [
                    str(BIN / "ray"),
                    "job",
                    "submit",
                    "--address",
                    server["dashboard"],
                    "--working-dir",
                    str(tmp_path),
                    "--",
                    "cicd-ray",
                    "run",
                    pipeline,
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if "No available agent" not in done.stderr or time.monotonic() > deadline:
                return done
            time.sleep(2)

    ok = job("job.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr + agent_problems()
    run_id = re.search(r"run (\S+) of as-job", ok.stdout).group(1)
    failed = job("fail.yaml")
    assert failed.returncode != 0 and "exit code 3" in failed.stdout, failed.stdout
    auth = {"CICD_RAY_URL": server["url"], "CICD_RAY_TOKEN": server["token"]}
    runs = {r["id"]: r for r in json.loads(server["cli"]("runs", "--json", **auth).stdout)}
    assert runs[run_id]["state"] == "succeeded" and runs[run_id]["pipeline"] == "as-job"
    assert any(r["pipeline"] == "job-fails" and r["state"] == "failed" for r in runs.values())


def test_run_against_the_cluster_with_source_env_and_timeout(server, tmp_path):
    """`run --address` joins the cluster `up` started; `--source` and `-e` reach the step;
    `--timeout` gives up waiting (exit 1) and leaves the run going."""
    cli, auth = server["cli"], {"CICD_RAY_URL": server["url"], "CICD_RAY_TOKEN": server["token"]}
    src = tmp_path / "src"
    src.mkdir()
    (src / "VERSION").write_text("4.5.6\n")
    pipeline = tmp_path / "opts.yaml"
    pipeline.write_text(
        "name: cli-opts\nenv: {WHO: file}\nsteps:\n"
        "  - {name: read, run: 'cat VERSION; echo $WHO'}\n"
    )
    done = cli(
        "run",
        str(pipeline),
        "--address",
        server["address"],
        "--source",
        str(src),
        "-e",
        "WHO=flag",
        RAY_AUTH_MODE="token",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = re.search(r"run (\S+) of cli-opts", done.stdout).group(1)
    assert cli("logs", run_id, "read", **auth).stdout == "4.5.6\nflag\n"

    slow = tmp_path / "slow.yaml"
    slow.write_text("name: cli-slow\nsteps:\n  - {name: wait, run: sleep 30}\n")
    t0 = time.monotonic()
    gave_up = cli(
        "run", str(slow), "--url", server["url"], "--timeout", "2", CICD_RAY_TOKEN=server["token"]
    )
    assert gave_up.returncode == 1 and "still running after 2" in gave_up.stderr, gave_up
    assert time.monotonic() - t0 < 60
    slow_id = re.search(r"run (\S+) of cli-slow", gave_up.stdout).group(1)
    assert json.loads(cli("status", slow_id, "--json", **auth).stdout)["run"]["state"] in (
        "queued",
        "running",
    )
    cli("cancel", slow_id, **auth)


def test_runs_filters_and_each_attempt_s_log(server, tmp_path):
    cli, auth = server["cli"], {"CICD_RAY_URL": server["url"], "CICD_RAY_TOKEN": server["token"]}
    flaky = tmp_path / "flaky.yaml"
    flaky.write_text(
        "name: cli-flaky\nsteps:\n  - name: f\n    retry: {max: 1, on: [failure]}\n"
        "    run: 'echo try $CICD_ATTEMPT; [ $CICD_ATTEMPT = 2 ]'\n"
    )
    failing = tmp_path / "failing.yaml"
    failing.write_text("name: cli-failing\nsteps:\n  - {name: f, run: exit 5}\n")
    ids = []
    for path in (flaky, failing, failing):
        done = cli("submit", str(path), "--follow", **auth)
        ids.append(re.search(r"run (\S+) of ", done.stdout).group(1))
    flaky_id, _, last_failed = ids
    assert cli("logs", flaky_id, "f", "--attempt", "1", **auth).stdout == "try 1\n"
    assert cli("logs", flaky_id, "f", "--attempt", "2", **auth).stdout == "try 2\n"
    assert cli("logs", flaky_id, "f", **auth).stdout == "try 2\n"

    def runs(*args: str) -> list[dict]:
        listed = cli("runs", "--json", *args, **auth)
        assert listed.returncode == 0, listed.stderr
        return json.loads(listed.stdout)

    failed = runs("--state", "failed", "--pipeline", "cli-failing")
    assert [r["state"] for r in failed] == ["failed", "failed"]
    assert [r["id"] for r in runs("--pipeline", "cli-failing", "--limit", "1")] == [last_failed]
    assert [r["id"] for r in runs("--state", "succeeded", "--pipeline", "cli-flaky")] == [flaky_id]
    assert runs("--state", "cancelled", "--pipeline", "cli-flaky") == []


def json_documents(text: str) -> list:
    """The JSON documents curl printed one after another (without newlines between them)."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while at < len(text.rstrip()):
        doc, end = decoder.raw_decode(text, at)
        out.append(doc)
        at = end
        while at < len(text) and text[at].isspace():
            at += 1
    return out


def test_the_api_guide_s_commands_run_as_written(server, tmp_path):
    """docs/api.md's curl blocks, run by bash as a user pastes them (with `H` from its block),
    in a folder with pipelines/hello.yaml and an ./app to pack, against the server."""
    from tests.docs_shell import block

    guide = "docs/api.md"
    header = block(guide, 'H="Authorization: Bearer $CICD_RAY_TOKEN"')
    work = tmp_path / "work"
    (work / "pipelines").mkdir(parents=True)
    (work / "pipelines" / "hello.yaml").write_text((ROOT / "pipelines/hello.yaml").read_text())
    (work / "app").mkdir()
    (work / "app" / "README").write_text("the app\n")
    env = {**server["env"], "CICD_RAY_URL": server["url"], "CICD_RAY_TOKEN": server["token"]}

    def sh(first_line: str, **extra: str) -> list:
        script = header + block(guide, first_line)
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=work,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, (first_line, done.stdout, done.stderr)
        return (
            json_documents(done.stdout) if done.stdout.lstrip().startswith("{") else [done.stdout]
        )

    assert sh("curl -s $CICD_RAY_URL/healthz")[0]["status"] == "ok"
    from tests.builders import make_repo

    git_dir = tmp_path / "git"
    git_dir.mkdir()
    submitted = sh(
        "curl -s -X POST $CICD_RAY_URL/api/v1/runs -H \"$H\" -H 'Idempotency-Key: build-4711' \\",
        REPO=make_repo(git_dir),
    )
    assert len(submitted) == 3 and all(s["run_id"] for s in submitted), submitted
    run, packed = submitted[0]["run_id"], submitted[1]["run_id"]
    with Client(server["url"], server["token"]) as client:
        assert client.run(run).wait(timeout=120).state == "succeeded"
        assert client.run(packed).wait(timeout=120).state == "succeeded"
    [log] = sh(
        'curl -sN "$CICD_RAY_URL/api/v1/runs/$RUN/steps/test%5Bpy%3D3.11%5D/log?'
        'follow=true" -H "$H"',
        RUN=run,
    )
    assert "testing on python 3.11" in log
    listed, view, cancelled = sh(
        'curl -s "$CICD_RAY_URL/api/v1/runs?state=failed&pipeline=hello&limit=20&offset=0" -H "$H"',
        RUN=run,
    )
    assert (listed["limit"], listed["offset"]) == (20, 0)
    assert all(r["state"] == "failed" and r["pipeline"] == "hello" for r in listed["runs"])
    assert view["run"]["id"] == run and view["run"]["state"] == "succeeded"
    assert cancelled == {"run_id": run, "state": "succeeded"}  # cancel of an ended run
    listed, explained, rerun = sh(
        'curl -s $CICD_RAY_URL/api/v1/runs/$RUN/artifacts -H "$H"  '
        "    # ?step=build for one step's",
        RUN=run,
    )
    assert [(f["step"], f["path"], f["size"]) for f in listed["artifacts"]] == [
        ("build", "out/app.txt", 9)
    ]
    assert (work / "app.txt").read_text() == "artifact\n"
    # Whatever ran before on this server, package has reuse off, and explain says so.
    assert explained["step"] == "package" and explained["reuse"] is False
    assert explained["summary"].endswith("reuse is off for this step (`reuse: true` turns it on)")
    assert rerun["rerun_of"] == run
    with Client(server["url"], server["token"]) as client:
        again = client.run(rerun["run_id"]).wait(timeout=120)
    assert again.state == "succeeded"  # everything carried over: the first run succeeded
    assert all(s["carried_from"]["run_id"] == run for s in again.steps)
    workers, queue = sh('curl -s $CICD_RAY_URL/api/v1/workers -H "$H"')
    assert any(w["state"] == "ready" for w in workers["workers"])
    assert set(queue["pools"]) == {"default"}
    gated = {
        "name": "release",
        "steps": [{"name": "production", "approval": {}, "run": "echo deployed"}],
    }
    with Client(server["url"], server["token"]) as client:
        waiting = [client.submit(gated) for _ in range(2)]
        for r in waiting:
            deadline = time.monotonic() + 60
            while r.refresh().steps[0]["state"] != "waiting_approval":
                assert time.monotonic() < deadline
                time.sleep(0.1)
        approved, rejected = sh(
            'curl -s -X POST $CICD_RAY_URL/api/v1/runs/$RUN/steps/production/approve -H "$H" \\',
            RUN=waiting[0].id,
            OTHER=waiting[1].id,
        )
        assert (approved["state"], approved["decision"]) == ("queued", "approved")
        assert (rejected["state"], rejected["decision"]) == ("failed", "rejected")
        assert waiting[0].wait(timeout=120).state == "succeeded"
        assert waiting[1].wait(timeout=120).state == "failed"
        token_id = hashlib.sha256(server["token"].encode()).hexdigest()[:12]
        assert waiting[0].steps[0]["approval"]["by"] == f"token {token_id}"
        assert waiting[0].steps[0]["approval"]["comment"] == "(ann) release 1.4"
    [audit] = sh('curl -s "$CICD_RAY_URL/api/v1/audit?limit=20" -H "$H"')
    token_id = hashlib.sha256(server["token"].encode()).hexdigest()[:12]
    answered = [
        (r["action"], r["run_id"], r["step"], r["token_id"])
        for r in audit["audit"]
        if r["action"] in ("approve", "reject")
    ]
    assert answered == [
        ("reject", waiting[1].id, "production", token_id),
        ("approve", waiting[0].id, "production", token_id),
    ]
    assert (audit["limit"], audit["offset"]) == (20, 0)


def test_the_shipped_serve_config_deploys_with_serve_deploy(server, tmp_path):
    """deploy/serve-config.yaml through Ray's `serve deploy` (last here: it replaces the API
    `up` deployed), with its placeholder replaced by a token's digest as its comment says:
    that token works, the one `up` made does not, /healthz answers."""
    from cicd_ray.tokens import digest, new_token

    token = new_token()
    shipped = (ROOT / "deploy/serve-config.yaml").read_text()
    assert shipped.count("REPLACE-WITH-SHA256-OF-YOUR-TOKEN") == 1
    config = tmp_path / "serve-config.yaml"
    config.write_text(shipped.replace("REPLACE-WITH-SHA256-OF-YOUR-TOKEN", digest(token)))
    ray_env = {**server["env"], "RAY_AUTH_MODE": "token"}
    deployed = subprocess.run(
        [str(BIN / "serve"), "deploy", str(config), "--address", server["dashboard"]],
        env=ray_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    def status() -> dict:
        shown = subprocess.run(
            [str(BIN / "serve"), "status", "--address", server["dashboard"]],
            env=ray_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return yaml.safe_load(shown.stdout) or {}

    deadline = time.monotonic() + 120
    app: dict = {}
    while time.monotonic() < deadline:
        app = status().get("applications", {}).get("cicd", {})
        replicas = app.get("deployments", {}).get("cicd-api", {}).get("replica_states", {})
        if app.get("status") == "RUNNING" and replicas == {"RUNNING": 2}:
            break
        time.sleep(1)
    assert app.get("status") == "RUNNING", app
    assert app["deployments"]["cicd-api"]["replica_states"] == {"RUNNING": 2}
    assert httpx.get(f"{server['url']}/healthz", timeout=10).status_code == 200

    def runs(with_token: str) -> int:
        return httpx.get(
            f"{server['url']}/api/v1/runs",
            timeout=10,
            headers={"Authorization": f"Bearer {with_token}"},
        ).status_code

    assert (runs(token), runs(server["token"])) == (200, 401)
