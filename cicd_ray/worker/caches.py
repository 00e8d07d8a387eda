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
import subprocess
import tarfile
import uuid
from pathlib import Path

from cicd_ray.ownership import as_user, popen_user
from cicd_ray.pipeline.cachekeys import expand
from cicd_ray.pipeline.model import CacheSpec
from cicd_ray.records import CacheUse
from cicd_ray.store.blobs import ArtifactStore
from cicd_ray.worker import beneath
from cicd_ray.worker.artifacts import matching

UNPACK_TIMEOUT_S = 600.0
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

    def restore(
        self,
        scopes: list[str],
        cache: CacheSpec,
        root: Path,
        env: dict[str, str],
        uid: int | None = None,
    ) -> CacheUse:
        """Unpack the entry the key names, else the newest one a restore key starts, looked
        for in each scope in order (a pull request's own, then its base's), into the attempt's
        folder: as the step's user `uid` when it has one (so nothing in the entry can write
        where that user could not), else in this process."""
        use = CacheUse(key=key_of(cache.key, root, env))
        entries = {
            scope: {key: (size, used) for _, key, size, used in self.store.cache_entries(scope)}
            for scope in scopes
        }
        found = self._choose(entries, use.key, cache.restore_keys, root, env)
        if found is None:
            return use
        scope, chosen = found
        size = entries[scope][chosen][0]
        local, use.from_node = self._local_copy(scope, chosen, size)
        if uid is None:
            with tarfile.open(local, "r:") as tar:
                tar.extractall(root, filter=_kept)
        else:
            unpack_as(uid, local, root)
        self.store.touch_cache(scope, chosen)
        use.result = "hit" if chosen == use.key else "partial"
        use.restored_from, use.bytes_restored = chosen, size
        return use

    def save(self, scope: str, cache: CacheSpec, use: CacheUse, root: Path, project: str) -> None:
        """Keep the cache's paths under its key, unless the key was restored exactly; then
        the project's least recently used entries go until it fits its cap."""
        if use.result == "hit":
            return
        self.local_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.local_dir / f"new-{uuid.uuid4().hex}.tmp"
        try:
            with tarfile.open(tmp, "w:", format=tarfile.PAX_FORMAT) as tar:
                found = sum(_pack(tar, root, _member(path)) for path in cache.paths)
            if not found:
                use.note = "nothing to save: none of its paths exists"
                return
            self.store.put_cache(scope, use.key, tmp)
            use.bytes_saved = tmp.stat().st_size
            os.replace(tmp, self._local_path(scope, use.key))
        finally:
            tmp.unlink(missing_ok=True)
        self._trim_local()
        self.store.evict_caches(self.cap_bytes, f"{project}/")

    @staticmethod
    def _choose(
        entries: dict[str, dict[str, tuple[int, float]]],
        key: str,
        restore_keys: list[str],
        root: Path,
        env: dict[str, str],
    ) -> tuple[str, str] | None:
        """(scope, key) of the entry to restore: the key itself in the first scope that has
        it, else the most recently used entry a restore key starts."""
        for scope, held in entries.items():
            if key in held:
                return scope, key
        for template in restore_keys:
            prefix = key_of(template, root, env)
            for scope, held in entries.items():
                found = [(used, k) for k, (_, used) in held.items() if k.startswith(prefix)]
                if found:
                    return scope, max(found)[1]
        return None

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


def _pack(tar: tarfile.TarFile, root: Path, member: str) -> int:
    """Add `member` of the attempt's folder (and what is under it) to the entry: folders,
    files and links (as links), read through descriptors with no link followed (the step's
    user may have made any name on the way a link: `beneath`); how many entries were added."""
    added = 0
    try:
        for entry in beneath.tree(root, member):
            info = tarfile.TarInfo(entry.rel)
            info.mode, info.mtime = entry.mode, int(entry.mtime)
            if entry.kind == "file":
                with beneath.open_file(root, entry.rel) as src:
                    info.size = os.fstat(src.fileno()).st_size
                    tar.addfile(info, src)
            else:
                info.type = tarfile.DIRTYPE if entry.kind == "folder" else tarfile.SYMTYPE
                info.linkname = entry.target
                tar.addfile(info)
            added += 1
    except beneath.LinkRefused as e:
        raise CacheRefused(f"{member.split('/', 1)[-1]}: {e}") from None
    return added


class CacheRefused(OSError):
    """A cache path runs through a link: nothing of it is saved."""


def unpack_as(uid: int, tar_path: Path, root: Path) -> None:
    """Unpack an entry into the attempt's folder as the step's user, with the system's tar:
    whatever the entry holds lands only where that user may write (its ws/ and home/)."""
    with tar_path.open("rb") as src:
        done = subprocess.run(
            as_user(
                uid,
                [
                    "tar",
                    "--extract",
                    "--file=-",
                    f"--directory={root}",
                    "--no-same-owner",
                    "--no-overwrite-dir",
                ],
            ),
            stdin=src,
            capture_output=True,
            timeout=UNPACK_TIMEOUT_S,
            **popen_user(uid),
        )
    if done.returncode != 0:
        raise OSError(f"tar: {done.stderr.decode(errors='replace').strip()[-300:]}")


def _kept(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """What is unpacked into an attempt's folder: files, folders and links under ws/ or
    home/, none landing outside it (links may point anywhere: a virtualenv's python does)."""
    if member.type not in KEPT_TYPES or not member.name.startswith(("ws/", "home/")):
        return None
    try:
        return tarfile.tar_filter(member, dest)
    except tarfile.FilterError:  # a path out of the folder, or through a link out of it
        return None
