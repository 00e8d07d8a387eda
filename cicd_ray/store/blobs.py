"""The artifact store: files kept from a step for the steps after it, caches, and the results
that reused steps point at, behind one URL.

`file:///var/lib/cicd-ray/artifacts` (the default: a folder under CICD_RAY_HOME) or
`s3://bucket/prefix` (any S3-compatible store; credentials and endpoint from the standard AWS
variables, e.g. a Kubernetes Secret's). fsspec gives both one interface (s3fs behind s3://):
files are streamed, never held whole in memory.

Layout under the root:
    blobs/ab/abcdef...   one file's content, named by its SHA-256: stored once however many
                         steps, runs and reused results point at it
    caches/SCOPE/KEY     a cache entry (a tar), and KEY.used, touched when it is restored
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cicd_ray.errors import CicdError
from cicd_ray.ownership import private_folder

CHUNK = 1 << 20


USED = ".used"


class ArtifactError(CicdError):
    """An artifact could not be kept or handed over; the step fails with this reason."""


def digest_of(src: BinaryIO) -> str:
    """The SHA-256 of what `src` holds from where it is; it is left at its start again."""
    h = hashlib.sha256()
    while chunk := src.read(CHUNK):
        h.update(chunk)
    src.seek(0)
    return h.hexdigest()


class ArtifactStore:
    """Files by their SHA-256 and cache entries by scope and key, under one fsspec URL (a folder
    or an S3 bucket), streamed, never held whole in memory."""

    def __init__(self, url: str) -> None:
        self.url = url
        # No listings cache: another process's new entries must be seen at once.
        self.fs, root = fsspec.core.url_to_fs(url, use_listings_cache=False)
        self.root = root.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)
        if self._local:  # the workers' alone: a step reads only what it is given
            private_folder(Path(self.root))

    # --- blobs ----------------------------------------------------------------------------------

    def _blob(self, digest: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ArtifactError(f"{digest!r} is not a SHA-256 digest")
        return f"{self.root}/blobs/{digest[:2]}/{digest}"

    def has(self, digest: str) -> bool:
        return self.fs.exists(self._blob(digest))

    def read(self, digest: str) -> bytes | None:
        """A blob's content (a source snapshot), or None when it is not stored."""
        try:
            with self.fs.open(self._blob(digest), "rb") as src:
                return src.read()
        except FileNotFoundError:
            return None

    def put(self, src: BinaryIO) -> str:
        """Keep a file's content under its digest, once (a digest already stored is not
        written again); returns the digest."""
        if not self._local:
            digest = digest_of(src)
            if not self.fs.exists(self._blob(digest)):
                self._write(src, self._blob(digest))
            return digest
        # A folder: copied aside while hashed (one read), then renamed to its digest.
        tmp, digest = _aside(src, Path(f"{self.root}/blobs"), hashed=True)
        target = Path(self._blob(digest))
        try:
            if not target.exists():
                target.parent.mkdir(exist_ok=True)
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return digest

    def _write(self, src: BinaryIO, target: str) -> None:
        if self._local:  # a reader never sees half a file: written aside, then renamed
            tmp, _ = _aside(src, Path(target).parent)
            try:
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        else:  # an object store's upload appears whole or not at all (when it is closed)
            with self.fs.open(target, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)

    def fetch(self, digest: str, dest: Path) -> None:
        """Copy a blob to `dest`: from a folder by the kernel's copy (its files were written
        once, under the digest of what was read); from an object store checking the digest
        on the way."""
        if self._local:
            try:
                shutil.copyfile(self._blob(digest), dest)
            except FileNotFoundError:
                raise ArtifactError(
                    f"stored file {digest[:12]} is no longer in the artifact store"
                ) from None
            return
        h = hashlib.sha256()
        with self.open(digest) as src, dest.open("wb") as out:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != digest:
            dest.unlink(missing_ok=True)
            raise ArtifactError(f"stored file {digest[:12]} does not match its digest")

    def open(self, digest: str):
        """A blob to read (streamed)."""
        try:
            if self._local:  # the plain file: fsspec's local reader is slower by half
                return open(self._blob(digest), "rb")
            return self.fs.open(self._blob(digest), "rb")
        except FileNotFoundError:
            raise ArtifactError(
                f"stored file {digest[:12]} is no longer in the artifact store"
            ) from None

    def digests(self) -> dict[str, float]:
        """Every blob stored, with when it was written."""
        try:
            found = self.fs.find(f"{self.root}/blobs", detail=True)
        except FileNotFoundError:
            return {}
        return {
            p.rsplit("/", 1)[-1]: _mtime(info)
            for p, info in found.items()
            if re.fullmatch(r"[0-9a-f]{64}", p.rsplit("/", 1)[-1])
        }

    def leftovers(self, before: float) -> list[Path]:
        """Files a worker killed mid-write left aside (a folder's `*.tmp`), older than
        `before`; an object store has none: its uploads appear whole or not at all."""
        if not self._local:
            return []
        return [p for p in Path(self.root).rglob("*.tmp") if p.stat().st_mtime < before]

    def delete(self, digests: set[str]) -> None:
        for digest in digests:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._blob(digest))

    # --- cache entries -------------------------------------------------------------------------

    def _entry(self, scope: str, key: str) -> str:
        return f"{self.root}/caches/{_name(scope)}/{_name(key)}"

    def cache_entries(self, scope: str | None = None) -> list[tuple[str, str, int, float]]:
        """(scope, key, size, last used) of the entries of one scope (None: of every scope)."""
        base = f"{self.root}/caches" + (f"/{_name(scope)}" if scope else "")
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return []
        used = {p[: -len(USED)]: _mtime(info) for p, info in found.items() if p.endswith(USED)}
        out = []
        for path, info in found.items():
            if path.endswith(USED) or path.endswith(".tmp"):
                continue
            scope_part, key_part = path.rsplit("/", 2)[-2:]
            with contextlib.suppress(ValueError):  # not an entry's name: not an entry
                out.append(
                    (
                        _unname(scope_part),
                        _unname(key_part),
                        int(info.get("size") or 0),
                        max(_mtime(info), used.get(path, 0.0)),
                    )
                )
        return out

    def put_cache(self, scope: str, key: str, path: Path) -> None:
        with path.open("rb") as src:
            self._write(src, self._entry(scope, key))

    def fetch_cache(self, scope: str, key: str, dest: Path) -> None:
        tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.fs.get_file(self._entry(scope, key), str(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def touch_cache(self, scope: str, key: str) -> None:
        """Note that an entry was used now (what least-recently-used eviction goes by)."""
        path = self._entry(scope, key) + USED
        if self._local:
            Path(path).touch()
        else:
            self.fs.pipe_file(path, b"")

    def delete_cache(self, scope: str, key: str) -> None:
        for path in (self._entry(scope, key), self._entry(scope, key) + USED):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)

    def evict_caches(self, cap_bytes: int, prefix: str = "") -> list[str]:
        """Delete the least recently used entries of the scopes starting `prefix` (a
        project's: `web/`) until they fit in `cap_bytes`; the keys deleted."""
        entries = sorted(
            (e for e in self.cache_entries() if e[0].startswith(prefix)), key=lambda e: e[3]
        )
        total = sum(e[2] for e in entries)
        gone = []
        for scope, key, size, _ in entries:
            if total <= cap_bytes:
                break
            self.delete_cache(scope, key)
            total -= size
            gone.append(key)
        return gone


def _name(text: str) -> str:
    """A scope or key as one name in the store: base64url, so that no character of it (a `/`
    in `web/build`, or its %-escape, which an S3 server decodes) splits it."""
    return base64.urlsafe_b64encode(text.encode()).decode()


def _unname(name: str) -> str:
    return base64.urlsafe_b64decode(name.encode()).decode()


def _aside(src: BinaryIO, folder: Path, hashed: bool = False) -> tuple[Path, str]:
    """`src` copied into a new file in `folder` (a `*.tmp` that retention sweeps if the
    writer dies), and its SHA-256 when `hashed` (computed on the way: one read)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"new-{uuid.uuid4().hex}.tmp"
    h = hashlib.sha256() if hashed else None
    try:
        with open(tmp, "wb") as out:
            while chunk := src.read(CHUNK):
                if h is not None:
                    h.update(chunk)
                out.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest() if h is not None else ""


def _mtime(info: dict) -> float:
    """An entry's modification time, whatever the file system calls it."""
    value = info.get("mtime") or info.get("LastModified") or info.get("created") or 0.0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)
