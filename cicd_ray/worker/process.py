"""A step's process followed to its end: its output read as it comes, its memory sampled, its
log flushed, its deadline kept (SIGTERM to its group, SIGKILL after the grace period), a
cancel noticed at once. One thread does it all, waiting on the output pipe, the process's
pidfd and a wake-up pipe, so a short step costs no extra threads.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from cicd_ray.states import StepState
from cicd_ray.worker.isolation import kill_user
from cicd_ray.worker.steplog import StepLog

READ_CHUNK_BYTES = 64 * 1024
FIRST_SAMPLE_S = 0.02
NO_PIDFD_POLL_S = 0.01
DRAIN_TIMEOUT_S = 5.0


@dataclass
class Ended:
    """How a step's process ended: killed (timed out or cancelled) or not, its exit code, its
    resource usage (wait4's) and the peak memory of its process group."""

    killed: StepState | None
    code: int
    usage: Any
    peak_rss: int


@dataclass
class _Clock:
    """When a running step next needs looking at: a memory sample (soon after the start, then
    less often, so short steps get a figure too), its deadline, the SIGKILL after a SIGTERM."""

    started: float
    deadline: float
    interval: float = FIRST_SAMPLE_S
    next_sample: float = 0.0
    killed: StepState | None = None
    kill_at: float = float("inf")

    def __post_init__(self) -> None:
        self.next_sample = self.started + self.interval

    def sleep_s(self, now: float) -> float:
        wake_at = min(self.next_sample, self.deadline if self.killed is None else self.kill_at)
        return max(0.0, wake_at - now)

    def sampled(self, now: float, longest_s: float) -> None:
        self.interval = min(self.interval * 2, longest_s)
        self.next_sample = now + self.interval


@dataclass
class Limits:
    """How long a step may run and how it is stopped and watched."""

    timeout_s: float
    kill_grace_s: float
    flush_interval_s: float


class Supervisor:
    """Follows one started process to its end (`follow`); `cancelled()` is asked whenever the
    wake-up pipe is written to, or a deadline comes."""

    def __init__(
        self,
        proc: subprocess.Popen,
        log: StepLog,
        limits: Limits,
        wake_fd: int,
        cancelled: Callable[[], bool],
        uid: int | None,
    ) -> None:
        self.proc = proc
        self.log = log
        self.limits = limits
        self.wake_fd = wake_fd
        self.cancelled = cancelled
        self.uid = uid  # the step's own user: all its processes die when it is killed
        self.peak_rss = 0

    def follow(self, started: float) -> Ended:
        proc = self.proc
        out = proc.stdout.fileno()
        os.set_blocking(out, False)
        pidfd = _pidfd(proc.pid)
        sel = selectors.DefaultSelector()
        sel.register(out, selectors.EVENT_READ)
        sel.register(self.wake_fd, selectors.EVENT_READ)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        clock = _Clock(started, deadline=started + self.limits.timeout_s)
        try:
            ended = None
            while ended is None:
                timeout = clock.sleep_s(time.monotonic())
                if pidfd is None:
                    timeout = min(timeout, NO_PIDFD_POLL_S)
                for key, _ in sel.select(timeout):
                    if key.fd == out:
                        self._drain(out, sel)
                    elif key.fd == self.wake_fd:
                        os.read(self.wake_fd, 64)
                ended = _reap(proc.pid)
                if ended is None:
                    self._on_time(clock, time.monotonic())
            # Background children the script left behind die with it, as on any CI runner;
            # then the pipe reaches its end and the last output is read.
            _signal_group(proc.pid, signal.SIGKILL)
            if clock.killed is not None and self.uid is not None:
                kill_user(self.uid)  # the step was killed before its own end
            self._drain_to_end(out, sel)
        finally:
            sel.close()
            if pidfd is not None:
                os.close(pidfd)
            proc.stdout.close()
        status, usage = ended
        proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped by wait4
        return Ended(clock.killed, code, usage, self.peak_rss)

    def _on_time(self, clock: _Clock, now: float) -> None:
        """Sample memory and flush the log when due; past the timeout (or on cancel) send
        SIGTERM to the group, and SIGKILL once the grace period is over."""
        pid = self.proc.pid
        if now >= clock.next_sample:
            self.peak_rss = max(self.peak_rss, _group_rss(pid))
            self.log.flush()
            clock.sampled(now, self.limits.flush_interval_s)
        cancelled = self.cancelled()
        if clock.killed is None and (cancelled or now >= clock.deadline):
            clock.killed = StepState.CANCELLED if cancelled else StepState.TIMED_OUT
            _signal_group(pid, signal.SIGTERM)
            clock.kill_at = now + self.limits.kill_grace_s
        elif now >= clock.kill_at:
            _signal_group(pid, signal.SIGKILL)
            clock.kill_at = float("inf")

    def _drain(self, fd: int, sel: selectors.BaseSelector) -> bool:
        """Read what the pipe holds now; True once it has reached its end."""
        while True:
            try:
                data = os.read(fd, READ_CHUNK_BYTES)
            except BlockingIOError:
                return False
            if not data:
                with contextlib.suppress(KeyError):
                    sel.unregister(fd)
                return True
            self.log.output(data)  # masked before a byte leaves the worker

    def _drain_to_end(self, fd: int, sel: selectors.BaseSelector) -> None:
        if fd not in sel.get_map():
            return
        give_up = time.monotonic() + DRAIN_TIMEOUT_S  # a process that escaped with setsid
        while time.monotonic() < give_up:
            sel.select(max(0.0, give_up - time.monotonic()))
            if self._drain(fd, sel):
                return


def tree_rss(root: psutil.Process) -> int:
    """Resident memory of a process and all its descendants, in bytes (processes that end
    while they are counted count as nothing)."""
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def _group_rss(pid: int) -> int:
    """Resident memory of the step's process tree, in bytes.

    Sampled, not taken from wait4: a child forked from the worker inherits the worker's own
    high-water mark, which would drown the step's figure.
    """
    try:
        return tree_rss(psutil.Process(pid))
    except psutil.Error:
        return 0


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when the process exits (Linux 5.3+), else None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _reap(pid: int):
    """(status, rusage) once the process has exited, else None."""
    reaped, status, usage = os.wait4(pid, os.WNOHANG)
    return (status, usage) if reaped else None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
