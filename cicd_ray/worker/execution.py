"""Run one attempt of a step: fresh workspace, clean environment, bash in its own process group.

No Ray here: the worker actor hands in the task and a callback for log chunks, and gets a
`StepOutcome` back. A failing step is an outcome, never an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import selectors
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

from cicd_ray.config import Settings
from cicd_ray.errors import IsolationError, SourceError
from cicd_ray.ownership import popen_user
from cicd_ray.records import ArtifactFile, CacheUse, StepOutcome, StepTask
from cicd_ray.secrets import Masker, SecretError, read_all
from cicd_ray.source import clone
from cicd_ray.states import StepState
from cicd_ray.store.blobs import ArtifactError, ArtifactStore
from cicd_ray.worker.artifacts import keep, place_inputs
from cicd_ray.worker.caches import NodeCaches
from cicd_ray.worker.isolation import (
    STEP_ROOT,
    Identity,
    clean_user,
    command,
    hand_over,
    isolating,
    kill_user,
    open_for_steps,
    pid_namespaces,
    take_identity,
    usable_by_others,
)

READ_CHUNK_BYTES = 64 * 1024
FIRST_SAMPLE_S = 0.02
NO_PIDFD_POLL_S = 0.01
DRAIN_TIMEOUT_S = 5.0
# The variables a step inherits from the worker; everything else comes from the pipeline.
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "USER", "LOGNAME", "TZ")
STEP_USER = "cicd-step"  # USER and LOGNAME of a step with a user of its own
SHARED_USER_NOTE = (
    "[cicd-ray] this step runs as the worker's user ({user}): the worker is "
    "not root, so the step can read what the worker can\n"
)


@dataclass
class ExecConfig:
    work_dir: Path
    log_cap_bytes: int = 5 * 1024 * 1024
    flush_interval_s: float = 0.25
    kill_grace_s: float = 3.0
    keep_workspace: bool = False
    # Users of their own for steps, when the worker is root (None: the worker's user).
    step_uids: range | None = None
    # Where attempts with a user of their own live: a path every user may traverse (work_dir,
    # under CICD_RAY_HOME, may be in root's home, which no one else may enter).
    step_dir: Path = STEP_ROOT
    # Where artifacts and caches are kept (None: a step's `artifacts:` and `cache:` fail).
    artifacts: ArtifactStore | None = None
    caches: NodeCaches | None = None
    artifact_max_bytes: int = 2 * 1024**3
    secrets_dir: Path | None = None  # CICD_RAY_SECRETS_DIR: <project>/<NAME> files

    @classmethod
    def of(
        cls, settings: Settings, work_dir: Path, step_uids: range | None, step_dir: Path = STEP_ROOT
    ) -> ExecConfig:
        """A worker's configuration from the settings; its node's cache copies are shared by
        every worker there (under the settings' work_dir)."""
        store = ArtifactStore(settings.artifacts_url)
        return cls(
            work_dir=work_dir,
            log_cap_bytes=settings.log_cap_bytes,
            flush_interval_s=settings.log_flush_interval_s,
            kill_grace_s=settings.kill_grace_s,
            keep_workspace=settings.keep_workspaces,
            step_uids=step_uids,
            step_dir=step_dir,
            artifacts=store,
            artifact_max_bytes=settings.artifact_max_bytes,
            caches=NodeCaches(store, settings.work_dir / "caches", settings.cache_max_bytes),
            secrets_dir=settings.secrets_dir,
        )


def truncation_marker(cap: int) -> bytes:
    return (
        f"\n[cicd-ray] log truncated: the step printed more than {cap} bytes; "
        "the rest was discarded\n"
    ).encode()


class _LogBuffer:
    """Collects output up to the cap and hands it out in numbered chunks (one thread uses it)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self.truncated = False
        self._pending = bytearray()
        self._seq = 0

    def add(self, data: bytes) -> None:
        if self.truncated:
            return
        room = self.cap - self.size
        if len(data) > room:
            data = data[:room] + truncation_marker(self.cap)
            self.truncated = True
        self._pending += data
        self.size += len(data)

    def take(self) -> tuple[int, bytes] | None:
        if not self._pending:
            return None
        self._seq += 1
        chunk, self._pending = bytes(self._pending), bytearray()
        return self._seq, chunk


def _safe_name(text: str) -> str:
    """A folder name of its own for every attempt id: readable, and told apart by a digest
    (`a[x=1]` and `a_x_1_` would otherwise share one)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80]
    return f"{readable}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def step_env(
    task: StepTask,
    workspace: Path,
    tmp: Path,
    home: Path,
    user: str | None = None,
    secrets: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment a step sees: a few inherited basics, the pipeline's env, the secrets it
    lists, cicd-ray's own. HOME and TMPDIR are the attempt's own; `user` names a step user of
    its own."""
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    # The worker's Python comes first, so `python` in a step is the one cicd-ray runs on.
    path = env.get("PATH", "/usr/bin:/bin")
    if user is None or usable_by_others(sys.executable):
        path = os.pathsep.join([str(Path(sys.executable).parent), path])
    env["PATH"] = path
    env.update(
        {"SHELL": "/bin/bash", "TERM": "dumb", "CI": "true", "TMPDIR": str(tmp), "HOME": str(home)}
    )
    if user:
        env["USER"] = env["LOGNAME"] = user
    env.update(task.step.env)
    env.update(secrets or {})
    env.update(
        {
            "CICD_RUN_ID": task.run_id,
            "CICD_STEP": task.step.name,
            "CICD_ATTEMPT": str(task.attempt),
            "CICD_WORKSPACE": str(workspace),
            "CICD_COMMIT": task.commit or "",
            "CICD_BRANCH": task.branch,
            "CICD_EVENT": task.event,
        }
    )
    if task.pr is not None:
        env["CICD_PR"] = str(task.pr)
    return env


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


class Execution:
    """One attempt. `run()` blocks until the step ends; `cancel()` may be called from any thread.

    One thread follows the step: it waits on the output pipe, the process's pidfd and a wake-up
    pipe for cancel, so a short step costs no extra threads.
    """

    def __init__(
        self,
        task: StepTask,
        config: ExecConfig,
        source_dir: Path | None,
        on_log: Callable[[int, bytes], None],
    ) -> None:
        self.task = task
        self.config = config
        self.source_dir = source_dir
        self.on_log = on_log
        self._isolated = isolating(config.step_uids)  # a user of its own for this attempt
        base = config.step_dir if self._isolated else config.work_dir
        self.root = base / _safe_name(task.attempt_id)
        self.workspace = self.root / "ws"
        self._cancelled = False
        self._wake_r, self._wake_w = os.pipe()
        self._wake_lock = threading.Lock()
        self._log = _LogBuffer(config.log_cap_bytes)
        self._masker = Masker([])  # the step's secrets, once read
        self._peak_rss = 0
        self._identity: Identity | None = None
        self._kept: list[ArtifactFile] = []
        self._caches: list[CacheUse] = []

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
                self._note(f"[cicd-ray] {e}\n".encode())
                return self._outcome(
                    StepState.FAILED, None, started, None, reason=f"could not start the step: {e}"
                )
            return self._follow(proc, started)
        finally:
            with self._wake_lock:
                os.close(self._wake_w)
                os.close(self._wake_r)
                self._wake_w = -1
            if not self.config.keep_workspace:
                shutil.rmtree(self.root, ignore_errors=True)
            if self._identity is not None:
                if not pid_namespaces():  # (in its own namespace, its end ended them all)
                    kill_user(self._identity.uid)
                clean_user(self._identity.uid)  # nothing of it outlives the attempt
                self._identity.release()

    def _start(self) -> subprocess.Popen:
        secrets = self._secrets()
        tmp, home = self._folders()
        self._bring_source(home)
        self._place_inputs()
        script = self.root / "step.sh"
        script.write_text(self.task.step.run, encoding="utf-8")
        if self._identity is not None:
            hand_over(self.root, self._identity.uid)
            os.chown(script, 0, self._identity.uid)  # the step reads it; it is root's
            script.chmod(0o640)
        elif os.geteuid() != 0:
            self._note(SHARED_USER_NOTE.format(user=_user_name()).encode())
        self._restore_caches()
        uid = self._identity.uid if self._identity else None
        return subprocess.Popen(
            command(str(script), self.task.step.memory_mb, uid),
            cwd=self.workspace,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=step_env(
                self.task, self.workspace, tmp, home, STEP_USER if self._identity else None, secrets
            ),
            start_new_session=True,  # its own process group: timeout and cancel kill it all
            **popen_user(uid),
        )

    def _follow(self, proc: subprocess.Popen, started: float) -> StepOutcome:
        out = proc.stdout.fileno()
        os.set_blocking(out, False)
        pidfd = _pidfd(proc.pid)
        sel = selectors.DefaultSelector()
        sel.register(out, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        clock = _Clock(started, deadline=started + self.task.step.timeout_s)
        try:
            ended = None
            while ended is None:
                timeout = clock.sleep_s(time.monotonic())
                if pidfd is None:
                    timeout = min(timeout, NO_PIDFD_POLL_S)
                for key, _ in sel.select(timeout):
                    if key.fd == out:
                        self._drain(out, sel)
                    elif key.fd == self._wake_r:
                        os.read(self._wake_r, 64)
                ended = _reap(proc.pid)
                if ended is None:
                    self._on_time(proc, clock, time.monotonic())
            # Background children the script left behind die with it, as on any CI runner;
            # then the pipe reaches its end and the last output is read.
            _signal_group(proc.pid, signal.SIGKILL)
            if clock.killed is not None and self._identity is not None:
                kill_user(self._identity.uid)  # the step was killed before its own end
            self._drain_to_end(out, sel)
        finally:
            sel.close()
            if pidfd is not None:
                os.close(pidfd)
            proc.stdout.close()
        status, usage = ended
        proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped by wait4
        return self._ended(clock.killed, code, started, usage)

    def _on_time(self, proc: subprocess.Popen, clock: _Clock, now: float) -> None:
        """Sample memory and flush the log when due; past the timeout (or on cancel) send
        SIGTERM to the group, and SIGKILL once the grace period is over."""
        if now >= clock.next_sample:
            self._peak_rss = max(self._peak_rss, _group_rss(proc.pid))
            self._flush()
            clock.sampled(now, self.config.flush_interval_s)
        if clock.killed is None and (self._cancelled or now >= clock.deadline):
            clock.killed = StepState.CANCELLED if self._cancelled else StepState.TIMED_OUT
            _signal_group(proc.pid, signal.SIGTERM)
            clock.kill_at = now + self.config.kill_grace_s
        elif now >= clock.kill_at:
            _signal_group(proc.pid, signal.SIGKILL)
            clock.kill_at = float("inf")

    def _ended(self, killed: StepState | None, code: int, started: float, usage) -> StepOutcome:
        if killed is StepState.TIMED_OUT:
            return self._outcome(
                killed,
                code,
                started,
                usage,
                reason=f"timed out after {self.task.step.timeout_s:g} s",
            )
        if killed is StepState.CANCELLED:
            return self._outcome(killed, code, started, usage, reason="cancelled")
        if code == 0:
            problem = self._keep()
            if problem:
                return self._outcome(StepState.FAILED, code, started, usage, reason=problem)
            return self._outcome(StepState.SUCCEEDED, 0, started, usage)
        return self._outcome(StepState.FAILED, code, started, usage, reason=f"exit code {code}")

    # --- artifacts and caches ----------------------------------------------------------------

    def _secrets(self) -> dict[str, str]:
        """The values of the secrets the step lists (a fork's pull request gets none of the
        project's); the masker learns them before anything is logged."""
        own = self.task.secret_values  # the submission's own, else the project's
        listed = [n for n in self.task.step.secrets if n not in own]
        if self.task.fork and listed:  # a fork's pull request: written by an outsider
            self._note(
                f"[cicd-ray] a pull request from a fork gets no secrets: "
                f"{', '.join(listed)} not set\n".encode()
            )
            listed = []
        secrets = {**read_all(self.config.secrets_dir, self.task.project, listed), **own}
        self._masker = Masker(list(secrets.values()))
        return secrets

    def _folders(self) -> tuple[Path, Path]:
        """The attempt's folder with its tmp/ and home/ (and its user, when it has one)."""
        if self.root.exists():
            shutil.rmtree(self.root)
        tmp, home = self.root / "tmp", self.root / "home"
        if self._isolated:
            open_for_steps(self.root.parent)
        tmp.mkdir(parents=True)
        home.mkdir()
        for private in (tmp, home):  # the step's own, whoever it runs as
            private.chmod(0o700)
        if self._isolated:
            self._identity = take_identity(self.config.step_uids, self.task.project)
            os.chown(self.root, 0, self._identity.uid)  # entered by its user from now on
            self.root.chmod(0o750)
        return tmp, home

    def _bring_source(self, home: Path) -> None:
        """The workspace with the run's source: the snapshot copied, or the repository
        cloned at its commit, as the step's user when it has one."""
        if self.source_dir is not None:
            shutil.copytree(self.source_dir, self.workspace, symlinks=True)
            return
        self.workspace.mkdir()
        git = self.task.source_git
        if git is None:
            return
        # A local repository (file://: an operator's or the cluster's own caller's, never
        # accepted through the API) is the worker's to read; a step's user cannot.
        local = git.git.startswith("file://")
        uid = self._identity.uid if self._identity and not local else None
        if uid is not None:
            for folder in (self.workspace, home):
                os.chown(folder, uid, uid)
        clone(git.git, self.task.commit or git.ref, self.workspace, uid=uid, home=home)

    def _place_inputs(self) -> None:
        """The needs' artifacts, into the workspace before it is handed over."""
        task, store = self.task, self.config.artifacts
        if task.inputs and store is None:
            raise ArtifactError("this worker has no artifact store")
        for line in place_inputs(store, task.inputs, self.workspace) if store else ():
            self._note(line.encode())

    def _restore_caches(self) -> None:
        """The step's caches, unpacked as its user once its folders are its own."""
        task = self.task
        env = step_env(task, self.workspace, self.root / "tmp", self.root / "home")
        uid = self._identity.uid if self._identity else None
        _, scopes = cache_scopes(task)
        for cache in task.step.cache:
            use = CacheUse(key=cache.key)
            try:
                if self.config.caches is None:
                    raise ArtifactError("this worker has no artifact store")
                use = self.config.caches.restore(scopes, cache, self.root, env, uid)
            except Exception as e:  # a cache saves time; without it the step still runs
                use.note = f"not restored: {e}"
            self._caches.append(use)
            self._note(f"[cicd-ray] cache {use.key}: {_cache_line(use)}\n".encode())

    def _keep(self) -> str:
        """After success: keep the artifacts (the reason the step fails when they cannot be
        kept) and save the caches."""
        task = self.task
        if self._identity is not None:
            kill_user(self._identity.uid)  # nothing of the step may change what is read now
        if task.step.artifacts:
            try:
                if self.config.artifacts is None:
                    raise ArtifactError("this worker has no artifact store")
                self._kept = keep(
                    self.config.artifacts,
                    self.workspace,
                    task.step.artifacts,
                    self.config.artifact_max_bytes,
                    task.artifact_room_bytes,
                )
            except (ArtifactError, OSError) as e:
                self._note(f"[cicd-ray] artifacts not kept: {e}\n".encode())
                return f"artifacts not kept: {e}"
            size = sum(f.size for f in self._kept)
            self._note(
                f"[cicd-ray] artifacts kept: {len(self._kept)} file(s), {size} bytes\n".encode()
            )
        scope, _ = cache_scopes(task)
        for cache, use in zip(task.step.cache, self._caches, strict=False):
            try:
                if scope is None:
                    use.note = "not saved: a fork's pull request saves no cache"
                elif self.config.caches is not None:
                    self.config.caches.save(scope, cache, use, self.root, task.project)
            except Exception as e:
                use.note = f"not saved: {e}"
            if use.bytes_saved or use.note:
                saved = f"saved {use.bytes_saved} bytes" if use.bytes_saved else use.note
                self._note(f"[cicd-ray] cache {use.key}: {saved}\n".encode())
        return ""

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
            self._log.add(self._masker.feed(data))  # before a byte leaves the worker

    def _drain_to_end(self, fd: int, sel: selectors.BaseSelector) -> None:
        if fd not in sel.get_map():
            return
        give_up = time.monotonic() + DRAIN_TIMEOUT_S  # a process that escaped with setsid
        while time.monotonic() < give_up:
            sel.select(max(0.0, give_up - time.monotonic()))
            if self._drain(fd, sel):
                return

    def _note(self, data: bytes) -> None:
        """A line of cicd-ray's own, after what the step printed so far (held back by the
        masker or not), and masked too (an error may quote what the step was given)."""
        self._log.add(self._masker.flush() + self._masker.feed(data) + self._masker.flush())

    def _flush(self) -> None:
        chunk = self._log.take()
        if chunk is not None:
            self.on_log(*chunk)

    def _outcome(
        self, state: StepState, code: int | None, started: float, usage, reason: str = ""
    ) -> StepOutcome:
        self._log.add(self._masker.flush())
        tail = self._log.take()
        return StepOutcome(
            attempt_id=self.task.attempt_id,
            run_id=self.task.run_id,
            step=self.task.step.name,
            state=state,
            exit_code=code,
            duration_s=round(time.monotonic() - started, 4),
            peak_memory_mb=round(self._peak_rss / 2**20, 2) if self._peak_rss else None,
            cpu_time_s=round(usage.ru_utime + usage.ru_stime, 4) if usage else None,
            reason=self._masker.text(reason),
            log_seq=tail[0] if tail else 0,
            log_tail=tail[1] if tail else b"",
            runs_as=(
                f"uid {self._identity.uid}"
                if self._identity
                else f"{_user_name()} (the worker's user)"
            ),
            artifacts=(
                [f.model_copy(update={"path": self._masker.text(f.path)}) for f in self._kept]
                if state is StepState.SUCCEEDED
                else []
            ),
            caches=self._caches,
        )


def cache_scopes(task: StepTask) -> tuple[str | None, list[str]]:
    """Where a step's caches are saved (None: nowhere) and restored from, in order: a
    project's own, per pipeline. A pull request's run restores from its own scope, then from
    the branches' (its base), and saves only to its own; a fork's saves nothing."""
    base = f"{task.project}/{task.pipeline}"
    if task.pr is None:
        return base, [base]
    own = f"{base}/pr-{task.pr}"
    return (None if task.fork else own), [own, base]


def _cache_line(use: CacheUse) -> str:
    if use.note:
        return use.note
    if use.result == "miss":
        return "miss"
    where = "this node's copy" if use.from_node else "the artifact store"
    return f"{use.result} ({use.restored_from}), {use.bytes_restored} bytes restored from {where}"


def _user_name() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, ImportError):
        return str(os.geteuid())


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
