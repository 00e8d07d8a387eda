"""Caches: folders a step keeps under a key, restored before the next run's step.

An entry is a tar of the cache's paths (workspace paths under `ws/`, `~/` paths under `home/`)
kept in the artifact store per pipeline, with a copy on each node that used it, so a warm
worker restores without a download. Both are capped in size (CICD_RAY_CACHE_MAX_BYTES); the
least recently used entries go first. A cache is an optimisation: when it cannot be restored
or saved the step goes on, and the attempt records why (`CacheUse.note`).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import uuid
from pathlib import Path

from cicd_ray.artifacts import ArtifactStore, matching
from cicd_ray.cachekeys import expand
from cicd_ray.records import CacheUse
from cicd_ray.spec import CacheSpec

KEPT_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE)


def key_of(template: str, root: Path, env: dict[str, str]) -> str:
    return expand(template, env, lambda globs: matching(root / "ws", globs))


def _member(path: str) -> str:
    """Where a cache path lives in the attempt's folder (and in the entry)."""
    return f"home/{path[2:]}" if path.startswith("~/") else f"ws/{path}"


class NodeCaches:
    """The caches of one node: the store's entries, with a local copy of those used here."""

    def __init__(self, store: ArtifactStore, local_dir: Path, cap_bytes: int) -> None:
        self.store = store
        self.local_dir = local_dir
        self.cap_bytes = cap_bytes

    def restore(self, scope: str, cache: CacheSpec, root: Path, env: dict[str, str]) -> CacheUse:
        use = CacheUse(key=key_of(cache.key, root, env))
        entries = {key: (size, used) for _, key, size, used in self.store.cache_entries(scope)}
        chosen = use.key if use.key in entries else None
        if chosen is None:
            for template in cache.restore_keys:
                prefix = key_of(template, root, env)
                found = [(used, key) for key, (_, used) in entries.items()
                         if key.startswith(prefix)]
                if found:
                    chosen = max(found)[1]
                    break
        if chosen is None:
            return use
        size = entries[chosen][0]
        local, use.from_node = self._local_copy(scope, chosen, size)
        with tarfile.open(local, "r:") as tar:
            tar.extractall(root, filter=_kept)
        self.store.touch_cache(scope, chosen)
        use.result = "hit" if chosen == use.key else "partial"
        use.restored_from, use.bytes_restored = chosen, size
        return use

    def save(self, scope: str, cache: CacheSpec, use: CacheUse, root: Path) -> None:
        """Keep the cache's paths under its key, unless the key was restored exactly."""
        if use.result == "hit":
            return
        present = [p for p in cache.paths if (root / _member(p)).exists()]
        if not present:
            use.note = "nothing to save: none of its paths exists"
            return
        self.local_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.local_dir / f"new-{uuid.uuid4().hex}.tmp"
        try:
            with tarfile.open(tmp, "w:", format=tarfile.PAX_FORMAT) as tar:
                for path in present:
                    tar.add(root / _member(path), arcname=_member(path), filter=_stored)
            self.store.put_cache(scope, use.key, tmp)
            use.bytes_saved = tmp.stat().st_size
            os.replace(tmp, self._local_path(scope, use.key))
        finally:
            tmp.unlink(missing_ok=True)
        self._trim_local()
        self.store.evict_caches(self.cap_bytes)

    def _local_path(self, scope: str, key: str) -> Path:
        name = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()[:32]
        return self.local_dir / f"{name}.tar"

    def _local_copy(self, scope: str, key: str, size: int) -> tuple[Path, bool]:
        """The node's copy of an entry, downloaded when it has none (or a stale one); and
        whether it was there already."""
        local = self._local_path(scope, key)
        if local.is_file() and local.stat().st_size == size:
            os.utime(local)  # used now: the node's eviction goes by it
            return local, True
        self.local_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store.fetch_cache(scope, key, local)
        self._trim_local()
        return local, False

    def _trim_local(self) -> None:
        copies = sorted(self.local_dir.glob("*.tar"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in copies)
        for path in copies[:-1]:  # the newest stays: it is about to be used
            if total <= self.cap_bytes:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)


def _stored(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Files, folders and links only: never a device or a pipe."""
    if member.type not in KEPT_TYPES:
        return None
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    return member


def _kept(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """What is unpacked into an attempt's folder: files, folders and links under ws/ or
    home/, none landing outside it (links may point anywhere: a virtualenv's python does)."""
    if member.type not in KEPT_TYPES or not member.name.startswith(("ws/", "home/")):
        return None
    try:
        return tarfile.tar_filter(member, dest)
    except tarfile.FilterError:  # a path out of the folder, or through a link out of it
        return None
