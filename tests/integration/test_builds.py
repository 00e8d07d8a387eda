"""Builds that carry state on the session's real cluster: the commit pinned while the branch
moves, artifacts between steps, a cache hit, a reused step that runs nothing, `explain`, a
re-run of the failed part, through the master, the HTTP API and the client."""

from __future__ import annotations

import subprocess

from cicd_ray.client import Client
from cicd_ray.states import StepState
from tests.integration.conftest import API_TOKEN


def shared_file(path):
    """A file every step user may append to (each attempt runs as a user of its own)."""
    path.touch()
    path.chmod(0o666)
    return path


def git(*args: str, cwd) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_the_commit_stays_pinned_when_the_branch_moves_between_two_steps(
    harness, tmp_path, shared_dir
):
    from tests.builders import make_repo

    url = make_repo(tmp_path)
    pinned = git("rev-parse", "main", cwd=tmp_path / "repo.git")
    gate = shared_dir / "gate"
    run_id = harness.submit(
        {
            "name": "pinned",
            "source": {"git": url, "ref": "main"},
            "steps": [
                {
                    "name": "first",
                    "run": f"git rev-parse HEAD; cat README; "
                    f"while [ ! -e {gate} ]; do sleep 0.05; done",
                },
                {"name": "second", "needs": ["first"], "run": "git rev-parse HEAD; cat README"},
            ],
        }
    )
    harness.wait_for_step(run_id, "first", StepState.RUNNING)
    (tmp_path / "work" / "README").write_text("version three\n")  # main moves on
    git("commit", "-qam", "three", cwd=tmp_path / "work")
    git("push", "-q", str(tmp_path / "repo.git"), "main", cwd=tmp_path / "work")
    moved = git("rev-parse", "main", cwd=tmp_path / "repo.git")
    assert moved != pinned
    gate.touch()
    view = harness.wait(run_id)
    assert view["run"]["state"] == "succeeded", view
    assert view["run"]["commit"] == pinned
    for step in ("first", "second"):
        assert harness.log(run_id, step) == f"{pinned}\nversion two\n"
    later = harness.wait(
        harness.submit(
            {
                "name": "pinned",
                "source": {"git": url, "ref": "main"},
                "steps": [{"name": "read", "run": "cat README"}],
            }
        )
    )
    assert later["run"]["commit"] == moved


def test_a_second_run_hits_the_cache_and_a_reused_step_runs_no_process(harness, shared_dir):
    evidence = shared_file(shared_dir / "evidence")
    pipeline = {
        "name": "warm",
        "steps": [
            {
                "name": "deps",
                "reuse": False,
                "run": f"echo deps >> {evidence}; "
                "ls vendor 2>/dev/null || echo cold; mkdir -p vendor; echo lib > vendor/lib",
                "cache": [{"key": "vendor-v1", "paths": ["vendor"]}],
            },
            {
                "name": "gen",
                "reuse": True,
                "artifacts": ["gen"],
                "run": f"echo gen >> {evidence}; mkdir gen; echo code > gen/code",
            },
        ],
    }
    first = harness.run(pipeline)
    assert first["run"]["state"] == "succeeded", first
    second = harness.run(pipeline)
    assert second["run"]["state"] == "succeeded", second
    assert sorted(evidence.read_text().split()) == ["deps", "deps", "gen"]  # gen ran once
    deps = [a for a in second["attempts"] if a["step"] == "deps"][-1]
    assert deps["caches"][0]["result"] == "hit" and deps["caches"][0]["bytes_restored"] > 0, (
        harness.log(second["run"]["id"], "deps")
    )
    assert "lib" in harness.log(second["run"]["id"], "deps")
    gen = harness.step(second, "gen")
    assert gen["reused_from"]["run_id"] == first["run"]["id"]
    assert [a["worker_id"] for a in second["attempts"] if a["step"] == "gen"] == [""]
    assert harness.log(second["run"]["id"], "gen").startswith("[cicd-ray] not run: reused")


def test_explain_names_the_input_that_changed_and_rerun_runs_the_failed_part(
    harness, api, shared_dir, tmp_path
):
    evidence, gate = shared_file(shared_dir / "evidence"), shared_dir / "gate"
    steps = [
        {
            "name": "gen",
            "reuse": True,
            "artifacts": ["out"],
            "env": {"FLAVOUR": "a"},
            "run": f"echo gen >> {evidence}; mkdir out; echo $FLAVOUR > out/flavour",
        },
        {
            "name": "test",
            "needs": ["gen"],
            "reuse": True,
            "run": f"echo test >> {evidence}; cat out/flavour; test -e {gate}",
        },
        {"name": "report", "needs": ["test"], "run": f"echo report >> {evidence}"},
        {"name": "docs", "run": f"echo docs >> {evidence}"},
    ]
    client = Client(api, API_TOKEN)
    failed = client.submit({"name": "part", "steps": steps}).wait(timeout=90)
    assert [s["state"] for s in failed.steps] == ["succeeded", "failed", "skipped", "succeeded"]
    # Its artifacts through the API: listed, downloaded, checked.
    [kept] = client.artifacts(failed.id)
    assert (kept["step"], kept["path"], kept["size"]) == ("gen", "out/flavour", 2)
    saved = client.download(failed.id, "gen", "out/flavour", tmp_path / "flavour")
    assert saved.read_text() == "a\n"
    assert client.artifacts(failed.id, step="docs") == []

    gate.touch()
    evidence.write_text("")
    again = client.rerun(failed.id, only_failed=True).wait(timeout=90)
    assert again.state == "succeeded" and again.view["run"]["rerun_of"] == failed.id
    assert sorted(evidence.read_text().split()) == ["report", "test"]
    carried = {s["spec"]["name"]: s["carried_from"] for s in again.steps}
    assert carried["gen"]["run_id"] == failed.id and carried["docs"]["run_id"] == failed.id
    assert carried["test"] is None and carried["report"] is None

    steps[0] = {**steps[0], "env": {"FLAVOUR": "b"}}
    changed = client.submit({"name": "part", "steps": steps}).wait(timeout=90)
    assert changed.state == "succeeded"
    said = client.explain(changed.id, "test")
    assert said["changed"] == [{"part": "inputs", "detail": "gen's out/flavour changed"}]
    assert said["compared_with"]["run_id"] == again.id
    assert client.explain(changed.id, "gen")["changed"][0]["part"] == "env"
