"""How a worker runs its steps: where attempts live, the log cap, the kill grace, the step users,
the artifact store and the node's caches; made once per worker from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cicd_ray.config import Settings
from cicd_ray.store.blobs import ArtifactStore
from cicd_ray.worker.caches import NodeCaches
from cicd_ray.worker.isolation import STEP_ROOT


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
