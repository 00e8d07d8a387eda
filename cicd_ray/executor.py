"""Run one attempt of a step: fresh workspace, clean environment, bash in its own process group.

No Ray here: the worker actor hands in the task and a callback for log chunks, and gets a
`StepOutcome` back. A failing step is an outcome, never an exception.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from cicd_ray.records import StepOutcome, StepTask
from cicd_ray.states import StepState

READ_CHUNK_BYTES = 64 * 1024
FIRST_SAMPLE_S = 0.02
# The variables a step inherits from the worker; everything else comes from the pipeline.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "USER", "LOGNAME", "TZ")


@dataclass
class ExecConfig:
    work_dir: Path
    log_cap_bytes: int = 5 * 1024 * 1024
    flush_interval_s: float = 0.25
    kill_grace_s: float = 3.0
    keep_workspace: bool = False


def truncation_marker(cap: int) -> bytes:
    return (f"\n[cicd-ray] log truncated: the step printed more than {cap} bytes; "
            "the rest was discarded\n").encode()


class _LogBuffer:
    """Collects output up to the cap and hands it out in numbered chunks."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self.truncated = False
        self._pending = bytearray()
        self._seq = 0
        self._lock = threading.Lock()

    def add(self, data: bytes) -> None:
        with self._lock:
            if self.truncated:
                return
            room = self.cap - self.size
            if len(data) > room:
                data = data[:room] + truncation_marker(self.cap)
                self.truncated = True
            self._pending += data
            self.size += len(data)

    def take(self) -> tuple[int, bytes] | None:
        with self._lock:
            if not self._pending:
                return None
            self._seq += 1
            chunk, self._pending = bytes(self._pending), bytearray()
            return self._seq, chunk


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:120]


def step_env(task: StepTask, workspace: Path, tmp: Path) -> dict[str, str]:
    """The environment a step sees: a few inherited basics, the pipeline's env, cicd-ray's own."""
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    # The worker's Python comes first, so `python` in a step is the one cicd-ray runs on.
    python_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([python_dir, env.get("PATH", "/usr/bin:/bin")])
    env.update({"SHELL": "/bin/bash", "TERM": "dumb", "CI": "true", "TMPDIR": str(tmp)})
    env.update(task.step.env)
    env.update({
        "CICD_RUN_ID": task.run_id,
        "CICD_STEP": task.step.name,
        "CICD_ATTEMPT": str(task.attempt),
        "CICD_WORKSPACE": str(workspace),
    })
    return env


class Execution:
    """One attempt. `run()` blocks until the step ends; `cancel()` may be called from any thread."""

    def __init__(self, task: StepTask, config: ExecConfig, source_dir: Path | None,
                 on_log: Callable[[int, bytes], None]) -> None:
        self.task = task
        self.config = config
        self.source_dir = source_dir
        self.on_log = on_log
        self.root = config.work_dir / _safe_name(task.attempt_id)
        self.workspace = self.root / "ws"
        self._wake = threading.Event()
        self._cancelled = False
        self._log = _LogBuffer(config.log_cap_bytes)
        self._peak_rss = 0

    def cancel(self) -> None:
        self._cancelled = True
        self._wake.set()

    def run(self) -> StepOutcome:
        started = time.monotonic()
        try:
            proc = self._start()
        except OSError as e:
            return self._outcome(StepState.FAILED, None, started, None,
                                 reason=f"could not start the step: {e}")
        try:
            return self._follow(proc, started)
        finally:
            if not self.config.keep_workspace:
                shutil.rmtree(self.root, ignore_errors=True)

    def _start(self) -> subprocess.Popen:
        shutil.rmtree(self.root, ignore_errors=True)
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True)
        if self.source_dir is not None:
            shutil.copytree(self.source_dir, self.workspace, symlinks=True)
        else:
            self.workspace.mkdir()
        script = self.root / "step.sh"
        script.write_text(self.task.step.run, encoding="utf-8")
        return subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", str(script)],
            cwd=self.workspace, env=step_env(self.task, self.workspace, tmp),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: timeout and cancel kill all of it
        )

    def _follow(self, proc: subprocess.Popen, started: float) -> StepOutcome:
        exited: dict[str, object] = {}

        def wait() -> None:
            _, status, usage = os.wait4(proc.pid, 0)
            exited.update(status=status, usage=usage)
            self._wake.set()

        reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        waiter = threading.Thread(target=wait, daemon=True)
        reader.start()
        waiter.start()
        deadline = started + self.task.step.timeout_s
        killed: StepState | None = None
        # Sample memory soon after the start, then less often: short steps get a figure too.
        interval = FIRST_SAMPLE_S
        while not exited:
            remaining = deadline - time.monotonic()
            self._wake.wait(max(0.0, min(interval, remaining)))
            self._wake.clear()
            if exited:
                break
            interval = min(interval * 2, self.config.flush_interval_s)
            self._peak_rss = max(self._peak_rss, _group_rss(proc.pid))
            self._flush()
            if killed is None and (self._cancelled or time.monotonic() >= deadline):
                killed = StepState.CANCELLED if self._cancelled else StepState.TIMED_OUT
                self._kill_group(proc.pid, started_at=time.monotonic())
                break
        waiter.join()
        proc.returncode = os.waitstatus_to_exitcode(exited["status"])  # reaped by wait4
        # Background children the script left behind die with it, as on any CI runner.
        _signal_group(proc.pid, signal.SIGKILL)
        reader.join(timeout=5)
        usage = exited["usage"]
        if killed is StepState.TIMED_OUT:
            return self._outcome(killed, proc.returncode, started, usage,
                                 reason=f"timed out after {self.task.step.timeout_s:g} s")
        if killed is StepState.CANCELLED:
            return self._outcome(killed, proc.returncode, started, usage, reason="cancelled")
        if proc.returncode == 0:
            return self._outcome(StepState.SUCCEEDED, 0, started, usage)
        return self._outcome(StepState.FAILED, proc.returncode, started, usage,
                             reason=f"exit code {proc.returncode}")

    def _kill_group(self, pgid: int, started_at: float) -> None:
        """SIGTERM the whole group, then SIGKILL what is left after the grace period."""
        _signal_group(pgid, signal.SIGTERM)
        grace_end = started_at + self.config.kill_grace_s
        while time.monotonic() < grace_end:
            if self._wake.wait(0.05):
                break
        _signal_group(pgid, signal.SIGKILL)

    def _read(self, proc: subprocess.Popen) -> None:
        fd = proc.stdout.fileno()
        while True:
            data = os.read(fd, READ_CHUNK_BYTES)
            if not data:
                break
            self._log.add(data)
        proc.stdout.close()

    def _flush(self) -> None:
        chunk = self._log.take()
        if chunk is not None:
            self.on_log(*chunk)

    def _outcome(self, state: StepState, code: int | None, started: float, usage,
                 reason: str = "") -> StepOutcome:
        tail = self._log.take()
        return StepOutcome(
            attempt_id=self.task.attempt_id, run_id=self.task.run_id, step=self.task.step.name,
            state=state, exit_code=code, duration_s=round(time.monotonic() - started, 4),
            peak_memory_mb=round(self._peak_rss / 2**20, 2) if self._peak_rss else None,
            cpu_time_s=round(usage.ru_utime + usage.ru_stime, 4) if usage else None,
            reason=reason, log_seq=tail[0] if tail else 0, log_tail=tail[1] if tail else b"",
        )


def _group_rss(pid: int) -> int:
    """Resident memory of the step's process tree, in bytes.

    Sampled, not taken from wait4: a child forked from the worker inherits the worker's own
    high-water mark, which would drown the step's figure.
    """
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
