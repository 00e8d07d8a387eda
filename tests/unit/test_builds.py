"""Builds that carry state, through the master's core and the real executor, in-process:
artifacts handed to the steps that need them, caches restored and saved, limits."""

from __future__ import annotations

import os

import pytest

from cicd_ray.config import Settings
from cicd_ray.pools import PoolConfig
from cicd_ray.reads.runs import run_view
from cicd_ray.store.memory import MemoryStore
from tests.builders import make, submitted

BUILD = {
    "name": "build",
    "steps": [
        {
            "name": "compile",
            "run": "mkdir -p dist/sub reports; echo bin > dist/app; "
            "echo deep > dist/sub/lib; echo '<x/>' > reports/t.xml; "
            "echo skip > reports/t.txt; ln -s /etc/hostname dist/link",
            "artifacts": ["dist/**", "reports/*.xml"],
        },
        {"name": "other", "run": "mkdir -p out; echo other > out/o", "artifacts": ["out"]},
        {
            "name": "package",
            "needs": ["compile"],
            "run": "cat dist/app dist/sub/lib reports/t.xml; test ! -e reports/t.txt; "
            "test ! -e dist/link; test ! -e out/o && echo ok",
        },
    ],
}


@pytest.fixture
def settings(tmp_path):
    return Settings(home=tmp_path, pools={"default": PoolConfig(name="default", workers=1, cpus=2)})


def steps_of(core, run_id):
    view = run_view(core.store, run_id)
    return view, {s.name: s for s in view.steps}


def log_of(core, run_id, step):
    attempt = [a for a in run_view(core.store, run_id).attempts if a.step == step][-1]
    return core.store.read_log(attempt.id).decode()


def test_a_step_gets_the_artifacts_of_the_steps_it_needs_and_no_others(settings):
    core, driver = make(settings)
    run_id = submitted(core.submit(BUILD))
    driver.run_until_idle()
    view, steps = steps_of(core, run_id)
    assert view.run.state == "succeeded", [(s.name, s.reason) for s in view.steps]
    assert log_of(core, run_id, "package").endswith("bin\ndeep\n<x/>\nok\n")
    kept = {f.path: f for f in steps["compile"].artifacts}
    assert sorted(kept) == ["dist/app", "dist/sub/lib", "reports/t.xml"]  # no link, no .txt
    assert kept["dist/app"].size == 4 and len(kept["dist/app"].digest) == 64
    attempt = next(a for a in view.attempts if a.step == "compile")
    assert attempt.artifacts == steps["compile"].artifacts  # recorded on the attempt too
    assert "artifacts of compile: 3 file(s)" in log_of(core, run_id, "package")


def test_artifacts_over_a_limit_fail_the_step_with_the_reason(settings, tmp_path):
    limited = settings.model_copy(update={"artifact_max_bytes": 1000})
    core, driver = make(limited)
    big = {
        "name": "big",
        "steps": [
            {
                "name": "a",
                "run": "mkdir dist; head -c 2000 /dev/zero > dist/big",
                "artifacts": ["dist"],
            },
            {"name": "b", "needs": ["a"], "run": "true"},
        ],
    }
    run_id = submitted(core.submit(big))
    driver.run_until_idle()
    _, steps = steps_of(core, run_id)
    assert steps["a"].state == "failed"
    assert steps["a"].reason == (
        "artifacts not kept: artifact dist/big is 2000 bytes, more "
        "than the 1000 allowed for one (CICD_RAY_ARTIFACT_MAX_BYTES)"
    )
    assert steps["b"].state == "skipped"
    per_run = settings.model_copy(update={"artifact_run_max_bytes": 3000})
    core, driver = make(per_run, store=MemoryStore())
    two = {
        "name": "two",
        "steps": [
            {"name": "a", "run": "head -c 2000 /dev/zero > f", "artifacts": ["f"]},
            {"name": "b", "needs": ["a"], "run": "head -c 2000 /dev/zero > g", "artifacts": ["g"]},
        ],
    }
    run_id = submitted(core.submit(two))
    driver.run_until_idle()
    _, steps = steps_of(core, run_id)
    assert steps["a"].state == "succeeded" and steps["b"].state == "failed"
    assert "more than the 1000 left for this run" in steps["b"].reason


CACHED = {
    "name": "cached",
    "steps": [
        {
            "name": "deps",
            "env": {"FLAVOUR": "x"},
            "cache": [
                {
                    "key": "deps-${{ env.FLAVOUR }}-${{ hashFiles('lock') }}",
                    "paths": ["vendor", "~/.cache/tool"],
                    "restore_keys": ["deps-${{ env.FLAVOUR }}-"],
                }
            ],
            "run": "echo $CICD_RUN_ID > lock-seen; ls vendor 2>/dev/null || echo empty; "
            "mkdir -p vendor ~/.cache/tool; echo $CICD_RUN_ID > vendor/$CICD_RUN_ID; "
            "echo t > ~/.cache/tool/t",
        }
    ],
}


def test_a_cache_misses_then_hits_then_restores_a_partial_match(settings, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "lock").write_text("v1\n")
    core, driver = make(settings)

    def run_with_lock(text):
        (src / "lock").write_text(text)
        run_id = submitted(core.submit(CACHED, source=driver.source(src)))
        driver.run_until_idle()
        view = run_view(core.store, run_id)
        assert view.run.state == "succeeded"
        return run_id, view.attempts[-1].caches[0], log_of(core, run_id, "deps")

    first, use, log = run_with_lock("v1\n")
    assert use.result == "miss" and use.bytes_saved > 0 and "empty" in log
    _, use, log = run_with_lock("v1\n")
    assert use.result == "hit" and use.from_node and use.bytes_restored > 0
    assert use.bytes_saved == 0  # an exact hit is not saved again
    assert first in log
    _, use, log = run_with_lock("v2\n")  # the lock changed: the newest deps-x-* entry
    assert use.result == "partial" and use.restored_from.startswith("deps-x-")
    assert use.key != use.restored_from and use.bytes_saved > 0
    assert "partial" in log and f"cache {use.key}" in log


def test_caches_are_evicted_least_recently_used_first_by_size(tmp_path):
    from cicd_ray.store.blobs import ArtifactStore

    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    for i, key in enumerate(["a", "b", "c"]):
        path = tmp_path / key
        path.write_bytes(b"x" * 100)
        store.put_cache("p", key, path)
        os.utime(store.fs._strip_protocol(store._entry("p", key)), (1000 + i, 1000 + i))
    store.touch_cache("p", "a")  # used just now: b is the least recently used
    assert store.evict_caches(250) == ["b"]
    assert sorted(k for _, k, _, _ in store.cache_entries("p")) == ["a", "c"]


def test_a_reused_step_runs_no_process_and_hands_on_the_artifacts_it_links(settings, tmp_path):
    evidence = tmp_path / "evidence"
    pipeline = {
        "name": "reuse",
        "steps": [
            {
                "name": "gen",
                "reuse": True,
                "artifacts": ["out"],
                "run": f"echo ran >> {evidence}; mkdir out; echo made > out/f",
            },
            {"name": "use", "needs": ["gen"], "reuse": True, "run": f"cat out/f >> {evidence}"},
        ],
    }
    core, driver = make(settings)
    first = submitted(core.submit(pipeline))
    driver.run_until_idle()
    assert evidence.read_text() == "ran\nmade\n"
    second = submitted(core.submit(pipeline))
    driver.run_until_idle()
    view, steps = steps_of(core, second)
    assert view.run.state == "succeeded"
    assert evidence.read_text() == "ran\nmade\n"  # neither step ran again
    assert steps["gen"].reused_from.run_id == first and steps["gen"].reused_from.step == "gen"
    assert steps["gen"].artifacts == steps_of(core, first)[1]["gen"].artifacts
    assert steps["use"].reused_from.run_id == first
    assert all(a.worker_id == "" and a.duration_s == 0 for a in view.attempts)
    assert log_of(core, second, "gen").startswith(
        f"[cicd-ray] not run: reused the success of run {first}, step gen, attempt 1"
    )
    changed = {
        **pipeline,
        "steps": [
            {**pipeline["steps"][0], "run": pipeline["steps"][0]["run"] + "; echo v2 >> out/f"},
            pipeline["steps"][1],
        ],
    }
    third = submitted(core.submit(changed))
    driver.run_until_idle()
    _, steps = steps_of(core, third)
    assert steps["gen"].reused_from is None and steps["use"].reused_from is None
    assert evidence.read_text() == "ran\nmade\nran\nmade\nv2\n"  # its input changed too


def test_explain_names_the_part_of_the_key_that_changed(settings):
    from cicd_ray.reads.explain import explain

    steps = [
        {
            "name": "gen",
            "reuse": True,
            "artifacts": ["out"],
            "run": "mkdir out; echo $LEVEL > out/f",
            "env": {"LEVEL": "1"},
        },
        {"name": "use", "needs": ["gen"], "reuse": True, "run": "cat out/f"},
        {"name": "plain", "run": "true"},
    ]
    core, driver = make(settings)
    first = submitted(core.submit({"name": "ex", "steps": steps}))
    driver.run_until_idle()
    assert "no earlier success of step gen" in explain(core.store, first, "gen").summary
    again = submitted(core.submit({"name": "ex", "steps": steps}))
    driver.run_until_idle()
    said = explain(core.store, again, "gen")
    assert said.reused_from.run_id == first and said.summary.startswith("not run: reused")
    plain = explain(core.store, again, "plain")
    assert plain.changed == [] and "`reuse: true` would have reused it" in plain.summary
    steps[0] = {**steps[0], "env": {"LEVEL": "2"}}
    third = submitted(core.submit({"name": "ex", "steps": steps}))
    driver.run_until_idle()
    said = explain(core.store, third, "gen")
    assert [(c.part, c.detail) for c in said.changed] == [("env", "variables changed LEVEL")]
    assert said.compared_with.run_id == again  # the last success, itself a reuse
    said = explain(core.store, third, "use")
    assert [(c.part, c.detail) for c in said.changed] == [("inputs", "gen's out/f changed")]
    assert "differs from run" in said.summary and "inputs" in said.summary


def test_rerun_of_the_failed_part_runs_it_and_what_needs_it_with_the_artifacts_carried(
    settings, tmp_path
):
    evidence, gate = tmp_path / "evidence", tmp_path / "gate"
    pipeline = {
        "name": "again",
        "steps": [
            {
                "name": "a",
                "run": f"echo a >> {evidence}; mkdir out; echo from-a > out/f",
                "artifacts": ["out"],
            },
            {
                "name": "b",
                "needs": ["a"],
                "run": f"echo b >> {evidence}; cat out/f; test -e {gate}",
            },
            {"name": "c", "needs": ["b"], "run": f"echo c >> {evidence}"},
            {"name": "d", "run": f"echo d >> {evidence}"},
        ],
    }
    core, driver = make(settings)
    first = submitted(core.submit(pipeline))
    driver.run_until_idle()
    _, steps = steps_of(core, first)
    assert {n: s.state.value for n, s in steps.items()} == {
        "a": "succeeded",
        "b": "failed",
        "c": "skipped",
        "d": "succeeded",
    }
    gate.touch()
    evidence.write_text("")
    second = submitted(core.submissions.rerun(first, only_failed=True))
    driver.run_until_idle()
    view, steps = steps_of(core, second)
    assert view.run.state == "succeeded" and view.run.rerun_of == first
    assert sorted(evidence.read_text().split()) == ["b", "c"]  # exactly the failed part
    assert (
        steps["a"].carried_from.run_id == first
        and steps["a"].reason == f"carried over from run {first}"
    )
    assert steps["a"].artifacts and "from-a" in log_of(core, second, "b")
    assert {a.step for a in view.attempts} == {"b", "c"}
    evidence.write_text("")
    third = submitted(core.submissions.rerun(second))  # all of it
    driver.run_until_idle()
    assert sorted(evidence.read_text().split()) == ["a", "b", "c", "d"]
    assert steps_of(core, third)[0].run.rerun_of == second
    assert core.submissions.rerun("no-such-run") is None


def test_a_local_artifact_store_is_its_owner_s_alone(tmp_path):
    import io
    import stat

    from cicd_ray.store.blobs import ArtifactStore

    store = ArtifactStore(f"file://{tmp_path / 'shared' / 'artifacts'}")
    digest = store.put(io.BytesIO(b"secret build output"))
    root = tmp_path / "shared" / "artifacts"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700  # steps' users cannot enter it
    assert store.has(digest) and set(store.digests()) == {digest}


@pytest.mark.parametrize(
    "pattern, path, matches",
    [
        ("dist/**", "dist/a/b.whl", True),
        ("dist/**", "dist", True),
        ("dist/**", "distx/a", False),
        ("**/*.xml", "reports/unit.xml", True),
        ("**/*.xml", "unit.xml", True),
        ("reports/*.xml", "reports/deep/unit.xml", False),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a?c", "abc", True),
        ("a?c", "a/c", False),
        ("*.[ch]", "x.h", True),
        ("*.[ch]", "x.o", False),
    ],
)
def test_globs_match_as_documented(pattern, path, matches):
    from cicd_ray.worker.artifacts import glob_match

    assert glob_match(pattern, path) is matches


def test_a_hostile_glob_is_matched_within_50_ms():
    import time

    from cicd_ray.worker.artifacts import glob_match

    started = time.perf_counter()
    assert not glob_match("*a" * 60 + "b", "a" * 250)
    assert not glob_match("**/" * 80 + "x", "/".join(["d"] * 60))
    assert time.perf_counter() - started < 0.05


def test_the_walk_enters_only_folders_a_pattern_could_name(tmp_path, monkeypatch):
    from cicd_ray.worker import artifacts

    for folder in ("dist/sub", "node_modules/a/b", "reports"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "f.xml").write_text("x")
    entered = []
    scandir = os.scandir
    monkeypatch.setattr(artifacts.os, "scandir", lambda p: entered.append(p) or scandir(p))
    found = [rel for rel, _ in artifacts.matching(tmp_path, ["dist/**", "reports/*.xml"])]
    assert found == ["dist/sub/f.xml", "reports/f.xml"]
    assert not any("node_modules" in str(p) for p in entered)


def test_a_hostile_cache_entry_lands_nothing_outside_the_attempt(tmp_path):
    """An entry in the store is written by steps (or by whoever reaches the bucket): a path
    with .., a link out and a file written through it, a device and a member outside ws/ and
    home/ are all left out; a virtualenv's absolute link is kept as a link."""
    import io
    import tarfile

    from cicd_ray.pipeline.model import CacheSpec
    from cicd_ray.store.blobs import ArtifactStore
    from cicd_ray.worker.caches import NodeCaches

    entry = tmp_path / "entry.tar"
    with tarfile.open(entry, "w") as tar:

        def add(name, data=b"x", **kw):
            info = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(info, k, v)
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)

        add("ws/ok.txt", b"fine")
        add("ws/../../escaped.txt")
        add("ws/out", type=tarfile.SYMTYPE, linkname=str(tmp_path / "outside"))
        add("ws/out/through.txt")
        add("ws/dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("elsewhere.txt")
        add("ws/.venv/bin/python", type=tarfile.SYMTYPE, linkname="/usr/bin/python3")
    (tmp_path / "outside").mkdir()
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    store.put_cache("p", "k", entry)
    root = tmp_path / "attempt"
    (root / "ws").mkdir(parents=True)
    caches = NodeCaches(store, tmp_path / "node", 10**9)
    use = caches.restore(["p"], CacheSpec(key="k", paths=["x"]), root, {})
    assert use.result == "hit"
    assert (root / "ws/ok.txt").read_text() == "fine"
    assert not (tmp_path / "escaped.txt").exists() and not (root.parent / "escaped.txt").exists()
    assert list((tmp_path / "outside").iterdir()) == []
    assert not (root / "ws/dev").exists() and not (root / "elsewhere.txt").exists()
    assert os.readlink(root / "ws/.venv/bin/python") == "/usr/bin/python3"


def test_a_rerun_of_a_run_still_going_is_refused_and_changes_nothing(settings):
    from cicd_ray.protocol import Rejected

    core, driver = make(settings)
    going = submitted(core.submit({"name": "going", "steps": [{"name": "a", "run": "true"}]}))
    before = [r.id for r in core.store.list_runs()]
    answer = core.submissions.rerun(going, only_failed=True)
    assert isinstance(answer, Rejected)
    assert answer.problems == [
        f"run {going} is still queued: re-run it once it has ended (or cancel it)"
    ]
    assert [r.id for r in core.store.list_runs()] == before
    driver.run_until_idle()


def test_caches_are_a_projects_own_and_a_pull_request_never_saves_to_its_base(tmp_path):
    """Issue 24, item 3: project b's pipeline of the same name neither restores project a's
    entry nor saves where a restores from; a pull request's run restores its base's entry
    and saves to its own scope; a fork's saves nothing."""
    from cicd_ray.pipeline.model import CacheSpec
    from cicd_ray.store.blobs import ArtifactStore
    from cicd_ray.worker.caches import NodeCaches
    from tests.builders import execute, task

    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    caches = NodeCaches(store, tmp_path / "node", 10**9)

    def run(project, pr=None, fork=False, attempt=1):
        t = task(
            "cat d/who 2>/dev/null || echo none; mkdir -p d; echo $WHO > d/who",
            env={"WHO": f"{project}-{pr}"},
            attempt=attempt,
        )
        t.step.cache = [CacheSpec(key="deps", paths=["d"])]
        t.project, t.pipeline, t.pr, t.fork = project, "build", pr, fork
        outcome, log, _ = execute(tmp_path, t, artifacts=store, caches=caches)
        return outcome.caches[0], log.splitlines()[1]

    use, seen = run("a")
    assert use.result == "miss" and use.bytes_saved and seen == "none"
    use, seen = run("b")  # same pipeline name, another project: a miss, not a's entry
    assert use.result == "miss" and seen == "none"
    use, seen = run("a", pr=7)  # restores the branches' entry, saves nothing over it
    assert use.result == "hit" and seen == "a-None"
    assert sorted(scope for scope, *_ in store.cache_entries()) == ["a/build", "b/build"]
    use, seen = run("a", pr=8, fork=True, attempt=2)
    assert use.result == "hit" and seen == "a-None"
    store.delete_cache("a/build", "deps")
    use, seen = run("a", pr=9, fork=True, attempt=3)
    assert use.result == "miss" and "a fork's pull request saves no cache" in use.note
    assert sorted(scope for scope, *_ in store.cache_entries()) == ["b/build"]


def test_reuse_and_explain_never_cross_projects(settings, tmp_path):
    """Issue 24, items 5 and 6: project b's run of a pipeline of the same name neither reuses
    project a's stored success (nor gets its artifact) nor has `explain` read a's runs."""
    from cicd_ray.reads.explain import explain

    evidence = tmp_path / "evidence"
    pipeline = {
        "name": "same",
        "steps": [
            {
                "name": "gen",
                "reuse": True,
                "artifacts": ["out"],
                "run": f"echo ran >> {evidence}; mkdir out; echo $CICD_RUN_ID > out/f",
            }
        ],
    }
    core, driver = make(settings)
    first = submitted(core.submit(pipeline, project="a"))
    driver.run_until_idle()
    other = submitted(core.submit(pipeline, project="b"))
    driver.run_until_idle()
    _, steps = steps_of(core, other)
    assert steps["gen"].reused_from is None and evidence.read_text() == "ran\nran\n"
    said = explain(core.store, other, "gen")
    assert said.compared_with is None and first not in said.summary
    again = submitted(core.submit(pipeline, project="a"))  # a's own success is still reused
    driver.run_until_idle()
    assert steps_of(core, again)[1]["gen"].reused_from.run_id == first


def test_a_kept_file_of_any_name_downloads_with_an_rfc_6266_disposition():
    """Issue 24, item 24: a name with CR/LF broke the header (a 500)."""
    from cicd_ray.api.builds import disposition

    assert disposition("report.xml") == (
        "attachment; filename=\"report.xml\"; filename*=UTF-8''report.xml"
    )
    odd = disposition('a"b\r\nX-Evil: 1\\é.txt')
    assert "\r" not in odd and "\n" not in odd
    assert odd == (
        'attachment; filename="a_b__X-Evil: 1__.txt"; '
        "filename*=UTF-8''a%22b%0D%0AX-Evil%3A%201%5C%C3%A9.txt"
    )
