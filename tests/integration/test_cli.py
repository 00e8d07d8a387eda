"""The command line as a user runs it: a subprocess with its own embedded Ray, then the store
read back with no cluster running."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

from cicd_ray.worker.isolation import usable_by_others

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "cicd_ray"]


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_validate_accepts_and_rejects_with_every_problem(cli, tmp_path):
    ok = cli("validate", "pipelines/hello.yaml")
    assert ok.returncode == 0
    assert "valid pipeline 'hello' with 6 step(s)" in ok.stdout
    bad = write(
        tmp_path,
        "bad.yaml",
        "name: Bad\nsteps:\n  - name: a\n    run: x\n    needs: [zzz]\n    tiemout: 3\n",
    )
    result = cli("validate", bad, "--json")
    assert result.returncode == 2
    problems = json.loads(result.stdout)["problems"]
    assert problems == [
        "name: 'Bad' does not match ^[a-z0-9][a-z0-9._-]{0,62}$",
        "steps[0] (a).tiemout: unknown key; allowed keys are: name, run, needs, matrix, env, "
        "pool, resources, timeout, retry, priority, interruptible, artifacts, cache, reuse, if, "
        "concurrency, approval, secrets",
    ]


def test_run_succeeds_then_status_runs_and_logs_work_without_a_cluster(cli):
    result = cli("run", "pipelines/hello.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("run ") and first.endswith(" of hello (embedded local Ray)")
    run_id = first.split()[1]
    assert f"run {run_id} succeeded" in result.stdout
    assert "test[py=3.11]" in result.stdout  # step names are printed as they are

    runs = json.loads(cli("runs", "--json").stdout)
    assert [(r["id"], r["state"]) for r in runs] == [(run_id, "succeeded")]
    status = json.loads(cli("status", run_id, "--json").stdout)
    assert [s["state"] for s in status["steps"]] == ["succeeded"] * 6
    table = cli("status", run_id).stdout
    assert "test[py=3.12]" in table and "succeeded" in table
    log = cli("logs", run_id, "test[py=3.10]")
    assert log.returncode == 0 and "testing on python 3.10" in log.stdout
    as_json = json.loads(cli("logs", run_id, "build", "--json").stdout)
    assert (as_json["attempt"], as_json["state"]) == (1, "succeeded")
    assert as_json["log"].startswith(f"hello from build (run {run_id}, attempt 1)")
    missing = cli("logs", run_id, "nope")
    assert missing.returncode == 1 and "has no step 'nope'" in missing.stderr
    assert cli("status", "no-such-run").returncode == 1
    # package received build's artifact, and the run's files are there to download.
    assert "all tests passed; packaging artifact" in cli("logs", run_id, "package").stdout
    assert "build: 1 artifact(s), 9 bytes" in cli("status", run_id).stdout


def test_artifacts_explain_and_rerun_of_the_failed_part(cli, tmp_path, shared_dir):
    gate = shared_dir / "gate"  # where the steps' own users can see it
    pipeline = write(
        tmp_path,
        "p.yaml",
        f"""
name: part
steps:
  - name: build
    run: mkdir -p dist && echo built > dist/app
    artifacts: [dist/**]
  - name: check
    needs: [build]
    run: cat dist/app && test -e {gate}
""",
    )
    failed = cli("run", pipeline)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    run_id = failed.stdout.split()[1]
    listed = cli("artifacts", run_id, "--step", "build", "--download", str(tmp_path / "dl"))
    assert listed.returncode == 0, listed.stderr
    assert "dist/app" in listed.stdout and (tmp_path / "dl/build/dist/app").read_text() == "built\n"
    files = json.loads(cli("artifacts", run_id, "--json").stdout)["artifacts"]
    assert [(f["step"], f["path"], f["size"]) for f in files] == [("build", "dist/app", 6)]
    said = cli("explain", run_id, "check")
    assert said.returncode == 0 and "no earlier success of step check" in said.stdout
    gate.touch()
    again = cli("rerun", run_id, "--failed")  # an embedded Ray, followed to the end
    assert again.returncode == 0, again.stdout + again.stderr
    new_id = again.stdout.splitlines()[0]
    status = json.loads(cli("status", new_id, "--json").stdout)
    assert status["run"]["rerun_of"] == run_id
    assert [(s["spec"]["name"], s["state"], bool(s["carried_from"])) for s in status["steps"]] == [
        ("build", "succeeded", True),
        ("check", "succeeded", False),
    ]
    assert f"a re-run of run {run_id}" in cli("status", new_id).stdout
    unknown = cli("explain", run_id, "nope")
    assert unknown.returncode == 1 and "has no step 'nope'" in unknown.stderr


def test_a_git_ref_that_names_no_commit_exits_2_at_submission(cli, tmp_path):
    from tests.builders import make_repo

    url = make_repo(tmp_path)
    pipeline = write(
        tmp_path,
        "git.yaml",
        f"name: git\nsource: {{git: '{url}', ref: nope}}\nsteps:\n  - {{name: a, run: 'true'}}\n",
    )
    result = cli("run", pipeline)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "source.ref: 'nope' names no branch, tag or commit" in result.stderr
    assert json.loads(cli("runs", "--json").stdout) == []  # nothing was stored


def test_run_failure_exits_1_and_prints_the_failed_steps_log_tail(cli, tmp_path):
    path = write(
        tmp_path,
        "fail.yaml",
        "name: fail\nsteps:\n  - name: unit\n    run: |\n"
        '      for i in $(seq 1 30); do echo "case $i"; done\n'
        "      echo 'AssertionError: 2 != 3'\n      exit 4\n"
        "  - {name: deploy, needs: [unit], run: 'true'}\n",
    )
    result = cli("run", path)
    assert result.returncode == 1
    out = result.stdout
    run_id = out.split()[1]
    never = cli("logs", run_id, "deploy")
    assert never.returncode == 1 and "'deploy' has not started" in never.stderr
    assert "unit: failed (exit code 4)" in out
    assert "AssertionError: 2 != 3" in out and "case 30" in out
    assert "case 5\n" not in out  # only the tail of the log
    assert " failed in " in out


def test_run_invalid_pipeline_exits_2_without_starting_anything(cli, tmp_path):
    path = write(
        tmp_path,
        "cycle.yaml",
        "name: c\nsteps:\n  - {name: a, run: x, needs: [b]}\n  - {name: b, run: x, needs: [a]}\n",
    )
    result = cli("run", path, timeout=60)
    assert result.returncode == 2
    assert "steps: the needs form a cycle: a -> b -> a" in result.stderr
    assert not (tmp_path / "home").exists()


def test_self_test_pipeline_checks_this_project(cli):
    # Its steps run this project's venv, whose Python lives under /root on the test machine:
    # a place step users cannot enter. The CLI says so; steps then run as root.
    warned = cli("run", "pipelines/hello.yaml", timeout=200)
    assert warned.returncode == 0, warned.stdout + warned.stderr
    if not usable_by_others(sys.executable):
        assert "CICD_RAY_STEP_UIDS=off" in " ".join(warned.stderr.split())
    result = cli("run", "pipelines/self-test.yaml", timeout=500, CICD_RAY_STEP_UIDS="off")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unit[part=scheduler]" in result.stdout


def test_run_on_the_redis_store_and_read_it_back_without_a_cluster(cli, redis_url, tmp_path):
    result = cli("run", "pipelines/hello.yaml", CICD_RAY_STORE=redis_url)
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = result.stdout.split()[1]
    status = json.loads(cli("status", run_id, "--json", CICD_RAY_STORE=redis_url).stdout)
    assert status["run"]["state"] == "succeeded"
    log = cli("logs", run_id, "test[py=3.10]", CICD_RAY_STORE=redis_url)
    assert "testing on python 3.10" in log.stdout
    assert not (tmp_path / "home" / "cicd.sqlite3").exists()  # nothing went to SQLite


def test_recommend_and_cost_from_the_history_of_real_runs(harness, cli, tmp_path):
    """Runs on the session cluster, then the CLI reads their attempts from its store."""
    doc = {
        "name": "sizing",
        "steps": [
            {
                "name": "hog",
                "resources": {"cpu": 2, "memory_mb": 1024},
                "run": 'python3 -c "b = bytearray(60 * 2**20); import time; time.sleep(0.5)"',
            },
            {
                "name": "spin",
                "resources": {"cpu": 0.5, "memory_mb": 64},
                "run": 'python3 -c "import time\nt = time.process_time()\n'
                'while time.process_time() - t < 1.5: pass"',
            },
        ],
    }
    for _ in range(3):
        assert harness.run(doc)["run"]["state"] == "succeeded"
    home = {"CICD_RAY_HOME": str(harness.settings.home)}
    done = cli("recommend", "sizing", "--json", **home)
    assert done.returncode == 0, done.stderr
    advice = {a["step"]: a for a in json.loads(done.stdout)}
    hog, spin = advice["hog"], advice["spin"]
    assert hog["samples"] == 3 and 60 <= hog["used_memory_mb_p95"] < 200
    assert hog["memory_mb"] < 512 and "asks 1024 MiB" in hog["note"]
    assert spin["used_cpu_p95"] > 0.6 and "asks only 0.5" in spin["note"]
    table = cli("recommend", "sizing", **home)
    assert "suggest MiB" in table.stdout and "hog" in table.stdout
    costs = json.loads(cli("cost", "--since", "1h", "--json", **home).stdout)
    assert {c["name"] for c in costs["pools"]} >= {"default"}
    [pipeline] = [c for c in costs["pipelines"] if c["name"] == "sizing"]
    assert pipeline["worker_seconds"] > 1.5
    bad = cli("cost", "--since", "yesterday", **home)
    said = " ".join(bad.stderr.replace("│", " ").split())  # typer's box wraps the message
    assert (
        bad.returncode == 2 and "'yesterday': expected an age such as 7d, 12h, 30m or 90s" in said
    )
    nothing = cli("recommend", "no-such-pipeline", **home)
    assert nothing.returncode != 0 and "no runs of pipeline 'no-such-pipeline'" in (
        nothing.stdout + nothing.stderr
    )


def test_gc_deletes_finished_runs_and_their_logs(cli, tmp_path):
    from tests.docs_shell import block

    done = cli("run", "pipelines/hello.yaml", timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = done.stdout.split()[1]
    # docs/operations.md's block as written: the run is younger than 7 days, so it stays.
    documented = block(
        "docs/operations.md",
        "cicd-ray gc --older-than 7d --dry-run   # would "
        "delete 12 run(s) with their logs, 3 source archive(s), ...",
    )
    env = {
        **os.environ,
        "CICD_RAY_HOME": str(tmp_path / "home"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    shown = subprocess.run(
        ["bash", "-e", "-c", documented], env=env, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0].startswith("would delete 0 run(s)"), shown.stdout
    assert shown.stdout.splitlines()[1].startswith("deleted 0 run(s)"), shown.stdout
    dry = cli("gc", "--older-than", "0s", "--dry-run")
    assert dry.returncode == 0 and "would delete 1 run(s)" in dry.stdout, dry.stderr
    assert cli("status", run_id).returncode == 0  # a dry run deletes nothing
    assert cli("gc", "--older-than", "30d").stdout.startswith("deleted 0 run(s)")
    gone = json.loads(cli("gc", "--older-than", "0s", "--json").stdout)
    assert gone["runs"] == 1 and gone["dry_run"] is False
    missing = cli("status", run_id)
    assert missing.returncode != 0 and "not found" in missing.stdout + missing.stderr
    bad = cli("gc", "--older-than", "soon")
    assert bad.returncode == 2 and "7d" in bad.stdout + bad.stderr


def test_the_master_exits_when_a_store_write_fails_and_the_run_still_completes(cli, tmp_path):
    """Redis refuses writes (NOREPLICAS) while a step runs: the master cannot record what
    happens, so it exits on purpose and Ray restarts it from the store, again until Redis
    takes writes. The step that ran through it is not run again; the run succeeds."""
    import tempfile

    import redis

    from cicd_ray.reads.runs import run_view
    from cicd_ray.states import RunState, StepState
    from cicd_ray.store import open_store
    from tests.integration.clusters import start_redis
    from tests.waiting import wait_until

    url, server = start_redis(tmp_path)
    control = redis.Redis.from_url(url)
    ray_tmp = tempfile.mkdtemp(prefix="cicd-w-", dir="/tmp")  # its own Ray logs to read
    path = write(
        tmp_path,
        "p.yaml",
        "name: storefail\nsteps:\n"
        "  - {name: a, run: 'sleep 4; echo a'}\n"
        "  - {name: b, needs: [a], run: 'echo b'}\n",
    )
    env = {
        **os.environ,
        "CICD_RAY_HOME": str(tmp_path / "home"),
        "CICD_RAY_STORE": url,
        "RAY_TMPDIR": ray_tmp,
    }
    proc = subprocess.Popen(
        [*CLI, "run", path],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        store = open_store(url)

        def running() -> bool:
            runs = store.list_runs(limit=5)
            view = run_view(store, runs[0].id) if runs else None
            return bool(view) and view.steps[0].state is StepState.RUNNING

        def masters() -> list[int]:
            found = []
            for candidate in psutil.process_iter(["cmdline"]):
                with contextlib.suppress(psutil.Error):
                    if (candidate.info["cmdline"] or [""])[0].startswith(
                        "ray::Master"
                    ) and candidate.environ().get("RAY_TMPDIR") == ray_tmp:
                        found.append(candidate.pid)
            return found

        wait_until(running, 120, "step a running")
        [first_master] = masters()
        control.config_set("min-replicas-to-write", 1)  # every write now fails
        logs = Path(ray_tmp) / "ray" / "session_latest" / "logs"

        def master_said_so() -> bool:
            return any(
                "store write failed, restarting the master" in p.read_text(errors="replace")
                for p in logs.glob("*.err")
            )

        wait_until(master_said_so, 60, "the master exiting on the failed write")
        wait_until(lambda: first_master not in masters(), 30, "the master process gone")
        control.config_set("min-replicas-to-write", 0)
        out, _ = proc.communicate(timeout=240)
        final = run_view(store, store.list_runs(limit=1)[0].id)
    finally:
        proc.kill()
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, out
    assert final.run.state is RunState.SUCCEEDED
    assert [(s.state, s.attempts) for s in final.steps] == [(StepState.SUCCEEDED, 1)] * 2


def test_run_starts_its_own_ray_whatever_ray_noted_last(cli, tmp_path):
    """Ray notes the latest `ray start` of the machine (ray_current_cluster) and joins it when
    given no address; `cicd-ray run` without --address starts a Ray of its own even when that
    note names a cluster that is gone."""
    import tempfile

    from tests.integration.clusters import free_port

    ray_tmp = Path(tempfile.mkdtemp(prefix="cicd-n-", dir="/tmp"))
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        done = cli("run", "pipelines/hello.yaml", RAY_TMPDIR=str(ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(embedded local Ray)" in done.stdout and " succeeded" in done.stdout


def test_approve_releases_a_waiting_step_and_status_shows_who(harness, api, cli):
    from cicd_ray.states import StepState
    from tests.integration.conftest import API_TOKEN

    run_id = harness.submit(
        {
            "name": "cli-approve",
            "steps": [
                {"name": "gate", "approval": {"prompt": "Ship it?"}},
                {"name": "ship", "needs": ["gate"], "run": "echo shipped"},
            ],
        }
    )
    harness.wait_for_step(run_id, "gate", StepState.WAITING_APPROVAL)
    remote = {"CICD_RAY_URL": api, "CICD_RAY_TOKEN": API_TOKEN}
    waiting = cli("status", run_id, **remote)
    assert "waiting_approval" in waiting.stdout
    assert f"cicd-ray approve {run_id} gate" in " ".join(waiting.stdout.split())
    nowhere = cli("approve", run_id, "gate")
    assert nowhere.returncode == 2 and "approve needs --url" in nowhere.stderr + nowhere.stdout
    done = cli("approve", run_id, "gate", "--comment", "looks good", "--by", "cli-user", **remote)
    assert done.returncode == 0, done.stderr
    assert f"gate in run {run_id}: succeeded" in done.stdout
    assert harness.wait(run_id)["run"]["state"] == "succeeded"
    shown = " ".join(cli("status", run_id, **remote).stdout.split())
    # Through the API, who answered is the token; the name given goes before the comment.
    assert "gate: approved by token " in shown and ": (cli-user) looks good" in shown
    again = cli("approve", run_id, "gate", **remote)
    assert again.returncode != 0 and "has ended (succeeded)" in again.stdout + again.stderr
