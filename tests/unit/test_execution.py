"""One attempt, run for real in a subprocess (no Ray)."""

from __future__ import annotations

import time

from cicd_ray.states import StepState
from cicd_ray.worker.config import ExecConfig
from cicd_ray.worker.execution import Execution
from tests.builders import execute, task
from tests.waiting import all_gone, pids_in


def test_success_environment_and_clean_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_WORKER_VAR", "the worker's own")
    outcome, log, _ = execute(
        tmp_path,
        task(
            'echo "$CICD_RUN_ID $CICD_STEP $CICD_ATTEMPT $MATRIX_PY $K $CI"; pwd; '
            'echo "[$SOME_WORKER_VAR]"; ls -A | wc -l',
            env={"K": "v"},
            matrix={"py": ["3.11"]},
        ),
    )
    assert outcome.state is StepState.SUCCEEDED and outcome.exit_code == 0
    lines = log.splitlines()
    assert lines[0] == "r1 s[py=3.11] 1 3.11 v true"
    assert lines[1].endswith("/ws")
    assert lines[2] == "[]"  # the worker's own environment does not leak into steps
    assert lines[3] == "0"
    assert list((tmp_path / "work").iterdir()) == []  # removed after the attempt


def test_the_run_s_trigger_is_in_the_environment(tmp_path):
    script = 'echo "[$CICD_EVENT] [$CICD_BRANCH] [$CICD_COMMIT] [${CICD_PR-none}]"'
    manual = task(script)
    assert execute(tmp_path, manual)[1] == "[manual] [] [] [none]\n"
    hooked = manual.model_copy(
        update={"event": "pull_request", "branch": "fix", "pr": 7, "commit": "c" * 40}
    )
    assert execute(tmp_path, hooked)[1] == f"[pull_request] [fix] [{'c' * 40}] [7]\n"


def test_failure_is_an_outcome_with_exit_code(tmp_path):
    outcome, log, _ = execute(tmp_path, task("echo before\nfalse\necho never"))
    assert outcome.state is StepState.FAILED and outcome.exit_code == 1
    assert outcome.reason == "exit code 1"
    assert log == "before\n"  # bash -e stopped at the failing command


def test_pipefail_is_on(tmp_path):
    outcome, _, _ = execute(tmp_path, task("false | cat"))
    assert outcome.state is StepState.FAILED


def test_source_is_copied_into_a_fresh_workspace(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("from source\n")
    t = task("cat sub/f.txt; echo changed > sub/f.txt")
    _, log, _ = execute(tmp_path, t, source=src)
    assert log == "from source\n"
    assert (src / "sub" / "f.txt").read_text() == "from source\n"


def test_timeout_kills_the_whole_process_group_including_background_children(tmp_path):
    pids = tmp_path / "pids"
    script = (
        f"sleep 300 & echo $! >> {pids}\n"
        f"(sleep 301 & echo $! >> {pids}; wait) &\n"
        f"trap '' TERM; echo started; sleep 302"
    )
    t0 = time.monotonic()
    outcome, log, _ = execute(tmp_path, task(script, timeout=1), kill_grace_s=0.5)
    assert outcome.state is StepState.TIMED_OUT
    assert outcome.reason == "timed out after 1 s"
    assert "started" in log
    assert time.monotonic() - t0 < 5
    left = pids_in(pids, 2)
    assert all_gone(left, timeout_s=5)


def test_background_children_do_not_outlive_a_successful_step(tmp_path):
    pids = tmp_path / "pids"
    outcome, _, _ = execute(tmp_path, task(f"sleep 300 & echo $! > {pids}; echo done"))
    assert outcome.state is StepState.SUCCEEDED
    assert all_gone(pids_in(pids), timeout_s=5)


def test_cancel_from_another_thread(tmp_path):
    import threading

    cfg = ExecConfig(work_dir=tmp_path / "w", kill_grace_s=0.5)
    ex = Execution(task("echo go; sleep 60"), cfg, None, lambda s, d: None)
    threading.Timer(0.5, ex.cancel).start()
    outcome = ex.run()
    assert outcome.state is StepState.CANCELLED and outcome.duration_s < 5


def test_log_is_streamed_in_order_while_the_step_runs(tmp_path):
    arrivals: list[tuple[float, bytes]] = []
    cfg = ExecConfig(work_dir=tmp_path / "w", flush_interval_s=0.1)
    t0 = time.monotonic()
    ex = Execution(
        task("for i in 1 2 3 4 5; do echo line $i; sleep 0.3; done"),
        cfg,
        None,
        lambda seq, data: arrivals.append((time.monotonic() - t0, data)),
    )
    outcome = ex.run()
    text = b"".join(d for _, d in arrivals) + outcome.log_tail
    assert text.decode().splitlines() == [f"line {i}" for i in range(1, 6)]
    # The first line arrived while the step still had most of its 1.5 s to go.
    assert arrivals and arrivals[0][0] < outcome.duration_s - 0.9, (arrivals, outcome)
    assert outcome.duration_s > 1.4


def test_log_is_capped_with_a_clear_marker(tmp_path):
    outcome, log, _ = execute(
        tmp_path, task("head -c 100000 /dev/zero | tr '\\0' x; echo"), log_cap_bytes=1000
    )
    assert outcome.state is StepState.SUCCEEDED
    assert log.startswith("x" * 1000)
    assert log.endswith(
        "[cicd-ray] log truncated: the step printed more than 1000 bytes; the rest was discarded\n"
    )


def test_peak_memory_is_measured_for_a_step_that_allocates(tmp_path):
    outcome, _, _ = execute(
        tmp_path, task("python -c 'import time; b = bytearray(200 * 2**20); time.sleep(0.6)'")
    )
    assert outcome.state is StepState.SUCCEEDED
    assert 180 < outcome.peak_memory_mb < 400
    assert outcome.cpu_time_s is not None


def test_a_step_has_a_private_tmpdir_and_home_and_reads_nothing_from_stdin(tmp_path):
    outcome, log, _ = execute(
        tmp_path,
        task(
            'echo "$TMPDIR"; echo "$HOME"; touch "$TMPDIR/scratch"; '
            'stat -c %a "$TMPDIR"; cat; readlink /proc/self/fd/0'
        ),
    )
    assert outcome.state is StepState.SUCCEEDED, log
    tmpdir, home, mode, stdin = log.splitlines()
    assert tmpdir.startswith(str(tmp_path / "work")) and home.startswith(str(tmp_path / "work"))
    assert tmpdir != home and tmpdir != "/tmp"
    assert mode == "700"
    assert stdin == "/dev/null"  # `cat` above read nothing and ended at once
    assert list((tmp_path / "work").iterdir()) == []  # the private TMPDIR went with it


def test_keep_workspace_leaves_the_attempt_s_files_for_debugging(tmp_path):
    outcome, _, _ = execute(tmp_path, task("echo built > out.txt"), keep_workspace=True)
    assert outcome.state is StepState.SUCCEEDED
    kept = list((tmp_path / "work").rglob("out.txt"))
    assert [p.read_text() for p in kept] == ["built\n"]
