"""The place an attempt runs in: prepared (its folder, tmp and home, the step's user, the
source, the needs' artifacts, the script, the caches), kept from (artifacts and caches after a
success) and cleaned (nothing of the attempt or its user outlives it).

An attempt with a user of its own lives under STEP_ROOT; its folder stays root's (0750, the
step's group) and only ws/, home/ and tmp/ are handed over, so the step cannot swap them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

from cicd_ray.protocol import StepTask
from cicd_ray.records import ArtifactFile, CacheUse
from cicd_ray.source import clone
from cicd_ray.store.blobs import ArtifactError
from cicd_ray.worker.artifacts import keep, place_inputs
from cicd_ray.worker.config import ExecConfig
from cicd_ray.worker.isolation import (
    Identity,
    clean_user,
    hand_over,
    isolating,
    kill_user,
    open_for_steps,
    pid_namespaces,
    take_identity,
    usable_by_others,
)
from cicd_ray.worker.steplog import StepLog

STEP_USER = "cicd-step"  # USER and LOGNAME of a step with a user of its own
SHARED_USER_NOTE = (
    "[cicd-ray] this step runs as the worker's user ({user}): the worker is "
    "not root, so the step can read what the worker can\n"
)
# The variables a step inherits from the worker; everything else comes from the pipeline.
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "USER", "LOGNAME", "TZ")


class Workspace:
    """One attempt's folder: `root` (the attempt's), `path` (its ws/, where the script runs)."""

    def __init__(
        self, task: StepTask, config: ExecConfig, source_dir: Path | None, log: StepLog
    ) -> None:
        self.task = task
        self.config = config
        self.source_dir = source_dir
        self.log = log
        self.isolated = isolating(config.step_uids)  # a user of its own for this attempt
        base = config.step_dir if self.isolated else config.work_dir
        self.root = base / safe_name(task.attempt_id)
        self.path = self.root / "ws"
        self.tmp, self.home = self.root / "tmp", self.root / "home"
        self.identity: Identity | None = None
        self.kept: list[ArtifactFile] = []
        self.caches: list[CacheUse] = []

    @property
    def uid(self) -> int | None:
        """The step's own user, or None: it runs as the worker's."""
        return self.identity.uid if self.identity else None

    def prepare(self) -> Path:
        """Everything the step finds when it starts; the script to run."""
        self._folders()
        self._bring_source()
        self._place_inputs()
        script = self.root / "step.sh"
        script.write_text(self.task.step.run, encoding="utf-8")
        if self.identity is not None:
            hand_over(self.root, self.identity.uid)
            os.chown(script, 0, self.identity.uid)  # the step reads it; it is root's
            script.chmod(0o640)
        elif os.geteuid() != 0:
            self.log.note(SHARED_USER_NOTE.format(user=user_name()))
        self._restore_caches()
        return script

    def _folders(self) -> None:
        """The attempt's folder with its tmp/ and home/ (and its user, when it has one)."""
        if self.root.exists():
            shutil.rmtree(self.root)
        if self.isolated:
            open_for_steps(self.root.parent)
        self.tmp.mkdir(parents=True)
        self.home.mkdir()
        for private in (self.tmp, self.home):  # the step's own, whoever it runs as
            private.chmod(0o700)
        if self.isolated:
            self.identity = take_identity(self.config.step_uids, self.task.project)
            os.chown(self.root, 0, self.identity.uid)  # entered by its user from now on
            self.root.chmod(0o750)

    def _bring_source(self) -> None:
        """The workspace with the run's source: the snapshot copied, or the repository
        cloned at its commit, as the step's user when it has one."""
        if self.source_dir is not None:
            shutil.copytree(self.source_dir, self.path, symlinks=True)
            return
        self.path.mkdir()
        git = self.task.source_git
        if git is None:
            return
        # A local repository (file://: an operator's or the cluster's own caller's, never
        # accepted through the API) is the worker's to read; a step's user cannot.
        local = git.git.startswith("file://")
        uid = self.uid if not local else None
        if uid is not None:
            for folder in (self.path, self.home):
                os.chown(folder, uid, uid)
        clone(git.git, self.task.commit or git.ref, self.path, uid=uid, home=self.home)

    def _place_inputs(self) -> None:
        """The needs' artifacts, into the workspace before it is handed over."""
        task, store = self.task, self.config.artifacts
        if task.inputs and store is None:
            raise ArtifactError("this worker has no artifact store")
        for line in place_inputs(store, task.inputs, self.path) if store else ():
            self.log.note(line)

    def _restore_caches(self) -> None:
        """The step's caches, unpacked as its user once its folders are its own."""
        task = self.task
        env = step_env(task, self.path, self.tmp, self.home)
        _, scopes = cache_scopes(task)
        for cache in task.step.cache:
            use = CacheUse(key=cache.key)
            try:
                if self.config.caches is None:
                    raise ArtifactError("this worker has no artifact store")
                use = self.config.caches.restore(scopes, cache, self.root, env, self.uid)
            except Exception as e:  # a cache saves time; without it the step still runs
                use.note = f"not restored: {e}"
            self.caches.append(use)
            self.log.note(f"[cicd-ray] cache {use.key}: {_cache_line(use)}\n")

    def keep(self) -> str:
        """After success: keep the artifacts (the reason the step fails when they cannot be
        kept) and save the caches."""
        task = self.task
        if self.identity is not None:
            kill_user(self.identity.uid)  # nothing of the step may change what is read now
        if task.step.artifacts:
            try:
                if self.config.artifacts is None:
                    raise ArtifactError("this worker has no artifact store")
                self.kept = keep(
                    self.config.artifacts,
                    self.path,
                    task.step.artifacts,
                    self.config.artifact_max_bytes,
                    task.artifact_room_bytes,
                )
            except (ArtifactError, OSError) as e:
                self.log.note(f"[cicd-ray] artifacts not kept: {e}\n")
                return f"artifacts not kept: {e}"
            size = sum(f.size for f in self.kept)
            self.log.note(f"[cicd-ray] artifacts kept: {len(self.kept)} file(s), {size} bytes\n")
        self._save_caches()
        return ""

    def _save_caches(self) -> None:
        task = self.task
        scope, _ = cache_scopes(task)
        for cache, use in zip(task.step.cache, self.caches, strict=False):
            try:
                if scope is None:
                    use.note = "not saved: a fork's pull request saves no cache"
                elif self.config.caches is not None:
                    self.config.caches.save(scope, cache, use, self.root, task.project)
            except Exception as e:
                use.note = f"not saved: {e}"
            if use.bytes_saved or use.note:
                saved = f"saved {use.bytes_saved} bytes" if use.bytes_saved else use.note
                self.log.note(f"[cicd-ray] cache {use.key}: {saved}\n")

    def clean(self) -> None:
        """Nothing of the attempt outlives it: its folder (unless kept for debugging), its
        user's processes and files in shared places; then its user is free again."""
        if not self.config.keep_workspace:
            shutil.rmtree(self.root, ignore_errors=True)
        if self.identity is not None:
            if not pid_namespaces():  # (in its own namespace, its end ended them all)
                kill_user(self.identity.uid)
            clean_user(self.identity.uid)
            self.identity.release()


def safe_name(text: str) -> str:
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


def user_name() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, ImportError):
        return str(os.geteuid())
