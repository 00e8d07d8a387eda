"""A step with a user of its own (the worker runs as root here, as on KubeRay): what it cannot
read, the limits it runs under, and that it dies with its worker. Real processes, no Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from cicd_ray.config import parse_uids
from cicd_ray.errors import IsolationError
from cicd_ray.states import StepState
from cicd_ray.worker.config import ExecConfig
from cicd_ray.worker.execution import Execution
from cicd_ray.worker.isolation import STEP_ROOT, address_space_kib
from tests.builders import task

if os.geteuid() != 0 and os.environ.get("CI"):
    raise RuntimeError("CI runs the tests as root: the isolation tests need it")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as the CI runs")
UIDS = "210000-210063"


def run_isolated(tmp_path, t, **config):
    chunks: list[bytes] = []
    cfg = ExecConfig(
        work_dir=tmp_path / "work",
        step_uids=parse_uids(UIDS),
        step_dir=steps_of(tmp_path),
        **config,
    )
    outcome = Execution(t, cfg, None, lambda seq, data: chunks.append(data)).run()
    return outcome, (b"".join(chunks) + outcome.log_tail).decode()


def steps_of(tmp_path):
    # Attempts' folders must be enterable by step users: not under pytest's 0700 folders.
    return STEP_ROOT / f"test-{os.getpid()}-{tmp_path.name}"


@pytest.fixture(autouse=True)
def _steps_dir(tmp_path):
    yield
    subprocess.run(["rm", "-rf", str(steps_of(tmp_path))], check=False)


def living_step_processes() -> list[psutil.Process]:
    """Processes of the test's step users that are not dead (a killed process is a zombie
    until whoever inherited it reaps it)."""
    users = parse_uids(UIDS)
    out = []
    for proc in psutil.process_iter(["uids", "status"]):
        if proc.info["uids"].real in users and proc.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(proc)
    return out


def test_a_step_runs_as_its_own_user_with_its_own_home_and_tmp(tmp_path):
    outcome, log = run_isolated(
        tmp_path,
        task(
            'id -u; echo "$HOME $TMPDIR $USER"; touch "$HOME/x" "$TMPDIR/y"; '
            'stat -c "%a %u" "$HOME" "$HOME/.."'
        ),
    )
    assert outcome.state is StepState.SUCCEEDED, log
    uid, paths, home_mode, root_mode = log.splitlines()
    assert int(uid) in parse_uids(UIDS) and outcome.runs_as == f"uid {uid}"
    home, tmp, user = paths.split()
    assert home.endswith("/home") and tmp.endswith("/tmp") and user == "cicd-step"
    # Its home is its own; the attempt's folder above stays root's, entered by its group alone.
    assert home_mode == f"700 {uid}" and root_mode == "750 0"


def test_a_step_cannot_reach_the_worker_root_or_another_attempt(tmp_path, monkeypatch):
    monkeypatch.setenv("CICD_RAY_STORE", "redis://:hunter2@redis:6379/0")
    other = task("echo secret > mine.txt; sleep 5", attempt=1)
    outcome_box = {}
    runner = threading.Thread(
        target=lambda: outcome_box.setdefault("o", run_isolated(tmp_path, other))
    )
    runner.start()
    time.sleep(1.0)
    probe = task(
        textwrap.dedent(f"""
        cat /proc/{os.getpid()}/environ >/dev/null 2>&1 && echo READ-ENVIRON
        grep -a hunter2 /proc/*/environ 2>/dev/null && echo FOUND-SECRET
        ls /root >/dev/null 2>&1 && echo LISTED-ROOT
        {{ cat /root/.ray/auth_token 2>&1 || true; }} |
            grep -q 'Permission denied' && echo TOKEN-DENIED
        cat {steps_of(tmp_path)}/*/ws/mine.txt 2>/dev/null && echo READ-OTHER
        ls {steps_of(tmp_path)} >/dev/null 2>&1 && echo LISTED-STEPS
        ls {STEP_ROOT} >/dev/null 2>&1 && echo LISTED-ROOT-OF-STEPS
        ls {tmp_path}/work >/dev/null 2>&1 && echo LISTED-WORK
        echo done
        """),
        attempt=2,
    )
    outcome, log = run_isolated(tmp_path, probe)
    runner.join()
    assert outcome.state is StepState.SUCCEEDED, log
    assert log.split() == ["TOKEN-DENIED", "done"], log
    assert outcome_box["o"][0].state is StepState.SUCCEEDED


def test_limits_follow_the_step_resources(tmp_path):
    t = task("ulimit -v; ulimit -u; ulimit -c")
    outcome, log = run_isolated(tmp_path, t)
    assert log.split() == [str(address_space_kib(t.step.memory_mb)), "1024", "0"]
    hog = task("/usr/bin/python3 -c 'bytearray(40 * 2**30)'")
    outcome, log = run_isolated(tmp_path, hog)
    assert outcome.state is StepState.FAILED and "MemoryError" in log


def test_a_fork_bomb_fails_its_own_step_and_leaves_nothing(tmp_path):
    bomb = task("for i in $(seq 3000); do sleep 60 & done", timeout=60)
    started = time.monotonic()
    outcome, log = run_isolated(tmp_path, bomb)
    assert outcome.state is StepState.FAILED, log
    assert "Resource temporarily unavailable" in log
    assert time.monotonic() - started < 30
    assert living_step_processes() == []


def test_a_setsid_escapee_dies_with_its_attempt(tmp_path):
    outcome, log = run_isolated(tmp_path, task("setsid sleep 300 & echo started"))
    assert outcome.state is StepState.SUCCEEDED and "started" in log
    assert living_step_processes() == []


def test_what_a_killed_worker_left_is_swept_by_another(tmp_path):
    """The worker (a process running the executor, no Ray here to kill its children) is
    SIGKILLed mid-step: its step's user is no longer held, and a sweep, which every other
    worker on the machine makes every few seconds, kills all it left, setsid escapees too."""
    from cicd_ray.worker.isolation import pid_namespaces, sweep

    worker = textwrap.dedent(f"""
        from pathlib import Path
        from cicd_ray.worker.config import ExecConfig
        from cicd_ray.worker.execution import Execution
        from cicd_ray.config import parse_uids
        from tests.builders import task
        cfg = ExecConfig(work_dir=Path({str(tmp_path / "work")!r}),
                         step_uids=parse_uids({UIDS!r}),
                         step_dir=Path({str(steps_of(tmp_path))!r}))
        t = task("sleep 300 & setsid sleep 301 & sleep 302")
        Execution(t, cfg, None, lambda *a: None).run()
        """)
    proc = subprocess.Popen([sys.executable, "-c", worker], cwd=os.getcwd())
    deadline = time.monotonic() + 20
    while len(living_step_processes()) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(living_step_processes()) >= 4  # the step's bash and three sleeps
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(living_step_processes()) >= 4  # orphans, until someone sweeps
    # (In a PID namespace, the first kill of its bash ends every process in it.)
    assert sweep(parse_uids(UIDS)) >= (1 if pid_namespaces() else 4)
    deadline = time.monotonic() + 10
    while living_step_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert living_step_processes() == []


def test_step_uids_setting():
    assert parse_uids("off") is None
    assert parse_uids("200000-200009") == range(200000, 200010)
    for bad in ("5-10", "abc", "300-200", "200000"):
        with pytest.raises(IsolationError, match="CICD_RAY_STEP_UIDS"):
            parse_uids(bad)


def test_sweep_kills_what_no_attempt_holds_and_spares_what_one_does():
    from cicd_ray.worker.isolation import sweep, take_identity

    users = parse_uids(UIDS)
    held = take_identity(users, "default")
    orphan_uid = users[(users.index(held.uid) + 1) % len(users)]
    orphan = subprocess.Popen(
        ["sleep", "300"], user=orphan_uid, group=orphan_uid, extra_groups=[], start_new_session=True
    )
    owned = subprocess.Popen(
        ["sleep", "300"], user=held.uid, group=held.uid, extra_groups=[], start_new_session=True
    )
    try:
        assert sweep(users) == 1
        assert orphan.wait(timeout=5) == -signal.SIGKILL
        assert owned.poll() is None  # its attempt still holds the user
    finally:
        owned.kill()
        owned.wait()
        held.release()


def test_a_step_root_someone_else_made_is_refused(tmp_path, monkeypatch):
    from cicd_ray.worker import isolation

    planted = Path("/var/tmp") / f"cicd-test-planted-{os.getpid()}"
    planted.mkdir()
    os.chown(planted, 210063, 210063)
    monkeypatch.setattr(isolation, "STEP_ROOT", planted)
    try:
        with pytest.raises(IsolationError, match="not a folder of the worker's own"):
            isolation.open_for_steps(planted / "w1")
    finally:
        subprocess.run(["rm", "-rf", str(planted)], check=False)


# --- root never follows a path a step could have touched (issue 24, items 1 and 3) ----------


@pytest.fixture()
def root_only(tmp_path):
    """A root-only folder with a token in it, outside every attempt (as the worker's own
    files are: /proc/<pid>/environ, ~/.ray/auth_token, the secrets folder)."""
    folder = Path(f"/var/tmp/cicd-root-only-{os.getpid()}-{tmp_path.name}")
    folder.mkdir(mode=0o700)
    (folder / "token").write_text("TOPSECRET-of-the-worker\n")
    (folder / "token").chmod(0o600)
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def stored_bytes(store_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in store_dir.rglob("*") if p.is_file())


def keeping_task(run: str, artifacts=(), cache=None):
    t = task(run)
    t.step.artifacts = list(artifacts)
    t.step.cache = [cache] if cache else []
    t.project, t.pipeline, t.artifact_room_bytes = "web", "p", 10**6
    return t


def test_a_step_swapping_its_workspace_for_a_link_to_root_keeps_nothing_outside(
    tmp_path, root_only
):
    from cicd_ray.store.blobs import ArtifactStore

    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    rel = str(root_only / "token").lstrip("/")
    outcome, log = run_isolated(
        tmp_path,
        keeping_task(
            '(cd .. && mv ws ws.old && ln -s / ws) 2>&1 || echo "could not swap"', artifacts=[rel]
        ),
        artifacts=store,
    )
    assert b"TOPSECRET" not in stored_bytes(tmp_path / "store")
    assert all(f.path != rel for f in outcome.artifacts)
    assert "could not swap" in log  # the attempt's folder is root's: ws cannot be replaced


def test_artifacts_and_a_cache_path_through_a_link_are_not_followed(tmp_path, root_only):
    from cicd_ray.pipeline.model import CacheSpec
    from cicd_ray.store.blobs import ArtifactStore
    from cicd_ray.worker.caches import NodeCaches

    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    caches = NodeCaches(store, tmp_path / "node", 10**9)
    outcome, log = run_isolated(
        tmp_path,
        keeping_task(
            f"ln -s {root_only} p; mkdir -p dist; ln -s {root_only}/token dist/t; echo ok > mine",
            artifacts=["p/token", "dist/**", "mine"],
            cache=CacheSpec(key="k", paths=["p/token"]),
        ),
        artifacts=store,
        caches=caches,
    )
    assert outcome.state is StepState.SUCCEEDED, log
    assert [f.path for f in outcome.artifacts] == ["mine"]
    assert "not saved" in log and "links are not followed" in log
    assert b"TOPSECRET" not in stored_bytes(tmp_path / "store")
    assert store.cache_entries() == []


def test_another_project_s_step_finds_nothing_of_this_one_s(tmp_path):
    """Issue 24, item 8: a file left in /dev/shm or /tmp by one project's step, and a
    `--password=` in its command line, were read by another project's step. Now each project
    has step users of its own, what a user owns in the shared places goes when its attempt
    ends, and a step sees only its own processes (a PID namespace each, where the machine
    allows: it does here, as root)."""
    from cicd_ray.worker.isolation import pid_namespaces

    tag = f"cicd-leak-{os.getpid()}"
    mine = task(
        f"id -u; echo hush > /dev/shm/{tag}; echo hush > /tmp/{tag}; "
        "(exec -a 'deploy --password=hunter2-xyz' sleep 4) & sleep 0.2; id -u >&2"
    )
    mine.project = "alpha"
    box = {}
    runner = threading.Thread(target=lambda: box.setdefault("a", run_isolated(tmp_path, mine)))
    runner.start()
    time.sleep(1.0)
    probe = task(
        f"id -u; cat /dev/shm/{tag} /tmp/{tag} 2>/dev/null || true; "
        "grep -a -h -o 'password=[^ ]*' /proc/[0-9]*/cmdline 2>/dev/null || true; "
        "ps -eo args | grep -c '[h]unter2' || true",
        attempt=2,
    )
    probe.project = "beta"
    _, log = run_isolated(tmp_path, probe)
    runner.join()
    alpha_uid = box["a"][1].split()[0]
    beta_uid, *rest = log.split()
    assert pid_namespaces()
    assert alpha_uid != beta_uid and rest == ["0"], log  # nothing read, no process seen
    assert not os.path.exists(f"/dev/shm/{tag}") and not os.path.exists(f"/tmp/{tag}")
    _, log = run_isolated(tmp_path, mine)
    assert log.split()[0] == alpha_uid  # alpha's user stays alpha's
