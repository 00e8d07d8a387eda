"""Run one attempt of a step: its workspace prepared, bash started in its own process group
with a clean environment, followed to its end, its artifacts and caches kept, and nothing of it
left behind.

No Ray here: the worker actor hands in the task and a callback for log chunks, and gets a
`StepOutcome` back. A failing step is an outcome, never an exception. The parts: the place
(`workspace`), the process (`process`), the log (`steplog`).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cicd_ray.errors import IsolationError, SourceError
from cicd_ray.ownership import popen_user
from cicd_ray.protocol import StepOutcome, StepTask
from cicd_ray.secrets import SecretError, read_all
from cicd_ray.states import StepState
from cicd_ray.store.blobs import ArtifactError
from cicd_ray.worker.config import ExecConfig
from cicd_ray.worker.isolation import command
from cicd_ray.worker.process import Ended, Limits, Supervisor
from cicd_ray.worker.steplog import StepLog
from cicd_ray.worker.workspace import STEP_USER, Workspace, step_env, user_name


class Execution:
    """One attempt. `run()` blocks until the step ends; `cancel()` may be called from any thread."""

    def __init__(
        self,
        task: StepTask,
        config: ExecConfig,
        source_dir: Path | None,
        on_log: Callable[[int, bytes], None],
    ) -> None:
        self.task = task
        self.config = config
        self.log = StepLog(config.log_cap_bytes, on_log)
        self.place = Workspace(task, config, source_dir, self.log)
        self._cancelled = False
        self._wake_r, self._wake_w = os.pipe()
        self._wake_lock = threading.Lock()
        self.peak_rss = 0  # of its process group, sampled

    def cancel(self) -> None:
        self._cancelled = True
        with self._wake_lock:
            if self._wake_w >= 0:
                os.write(self._wake_w, b"!")

    def run(self) -> StepOutcome:
        started = time.monotonic()
        try:
            try:
                proc = self._start()
            except (OSError, SourceError, IsolationError, ArtifactError, SecretError) as e:
                self.log.note(f"[cicd-ray] {e}\n")
                return self._outcome(
                    StepState.FAILED, None, started, None, f"could not start the step: {e}"
                )
            limits = Limits(
                self.task.step.timeout_s, self.config.kill_grace_s, self.config.flush_interval_s
            )
            supervisor = Supervisor(
                proc, self.log, limits, self._wake_r, lambda: self._cancelled, self.place.uid
            )
            return self._ended(supervisor.follow(started), started)
        finally:
            with self._wake_lock:
                os.close(self._wake_w)
                os.close(self._wake_r)
                self._wake_w = -1
            self.place.clean()

    def _start(self) -> subprocess.Popen:
        secrets = self._secrets()
        script = self.place.prepare()
        uid, place = self.place.uid, self.place
        user = STEP_USER if uid is not None else None
        return subprocess.Popen(
            command(str(script), self.task.step.memory_mb, uid),
            cwd=place.path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=step_env(self.task, place.path, place.tmp, place.home, user, secrets),
            start_new_session=True,  # its own process group: timeout and cancel kill it all
            **popen_user(uid),
        )

    def _secrets(self) -> dict[str, str]:
        """The values of the secrets the step lists (a fork's pull request gets none of the
        project's); the log learns them before anything is logged."""
        own = self.task.secret_values  # the submission's own, else the project's
        listed = [n for n in self.task.step.secrets if n not in own]
        if self.task.fork and listed:  # a fork's pull request: written by an outsider
            self.log.note(
                f"[cicd-ray] a pull request from a fork gets no secrets: "
                f"{', '.join(listed)} not set\n"
            )
            listed = []
        secrets = {**read_all(self.config.secrets_dir, self.task.project, listed), **own}
        self.log.learn(list(secrets.values()))
        return secrets

    def _ended(self, ended: Ended, started: float) -> StepOutcome:
        self.peak_rss = ended.peak_rss
        killed, code, usage = ended.killed, ended.code, ended.usage
        if killed is StepState.TIMED_OUT:
            reason = f"timed out after {self.task.step.timeout_s:g} s"
            return self._outcome(killed, code, started, usage, reason)
        if killed is StepState.CANCELLED:
            return self._outcome(killed, code, started, usage, "cancelled")
        if code != 0:
            return self._outcome(StepState.FAILED, code, started, usage, f"exit code {code}")
        problem = self.place.keep()
        if problem:
            return self._outcome(StepState.FAILED, code, started, usage, problem)
        return self._outcome(StepState.SUCCEEDED, 0, started, usage)

    def _outcome(
        self, state: StepState, code: int | None, started: float, usage, reason: str = ""
    ) -> StepOutcome:
        tail = self.log.tail()
        peak = self.peak_rss
        identity = self.place.identity
        kept = self.place.kept if state is StepState.SUCCEEDED else []
        return StepOutcome(
            attempt_id=self.task.attempt_id,
            run_id=self.task.run_id,
            step=self.task.step.name,
            state=state,
            exit_code=code,
            duration_s=round(time.monotonic() - started, 4),
            peak_memory_mb=round(peak / 2**20, 2) if peak else None,
            cpu_time_s=round(usage.ru_utime + usage.ru_stime, 4) if usage else None,
            reason=self.log.masked(reason),
            log_seq=tail[0] if tail else 0,
            log_tail=tail[1] if tail else b"",
            runs_as=f"uid {identity.uid}" if identity else f"{user_name()} (the worker's user)",
            artifacts=[f.model_copy(update={"path": self.log.masked(f.path)}) for f in kept],
            caches=self.place.caches,
        )
