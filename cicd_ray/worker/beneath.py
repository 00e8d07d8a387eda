"""Reading what a step could have touched, without ever following a link.

A worker running as root keeps a step's artifacts and saves its caches after the step has
run as a user of its own. Everything under the step's folders is that user's: any name in a
path may have been swapped for a link to `/` (or to `/proc/<worker>/environ`). So a path
under such a folder is never handed to the kernel whole: the walk starts from a folder the
worker opened itself and opens one name at a time relative to it, with `O_NOFOLLOW` (a link
anywhere is refused, not followed), and reads what it found through those descriptors. This
is what `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` does in one call; Python's `os` has
no openat2, and the walk needs the descriptors anyway.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a pipe put where a file was must not hang the worker (it is refused below).
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class LinkRefused(OSError):
    """A name on the way was a link, or not what it had to be: nothing was followed."""


def _parts(rel: str) -> list[str]:
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LinkRefused(f"{rel!r} leaves its folder (..)")
    return parts


def _open_one(name: str, dir_fd: int | None, flags: int, rel: str) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (40, 20):  # ELOOP: a link; ENOTDIR: a file (or a link) for a folder
            raise LinkRefused(
                f"{rel or name}: a link or not a folder; links are not followed"
            ) from None
        raise


def open_folder(path: Path) -> int:
    """A folder's descriptor; `path`'s last name must not be a link (the names above it are
    the worker's own)."""
    return _open_one(str(path), None, FOLDER_FLAGS, str(path))


def open_under(top: int, rel: str, folder: bool = False) -> int:
    """The descriptor of `rel` beneath the folder `top`, opened name by name with no link
    followed; a file must be a regular file."""
    parts = _parts(rel)
    fd = os.dup(top)
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            flags = FILE_FLAGS if last and not folder else FOLDER_FLAGS
            nxt = _open_one(name, fd, flags, "/".join(parts[: i + 1]))
            os.close(fd)
            fd = nxt
        if not folder and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LinkRefused(f"{rel}: not a regular file")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_file(root: Path, rel: str) -> BinaryIO:
    """The regular file `rel` beneath `root`, to read, with no link followed on the way."""
    top = open_folder(root)
    try:
        return os.fdopen(open_under(top, rel), "rb")
    finally:
        os.close(top)


@dataclass
class Entry:
    """One thing found beneath a folder: its path there, its kind, and (a link) its target."""

    rel: str
    kind: str  # "folder", "file" or "link"
    mode: int
    mtime: float
    target: str = ""


def listing(top: int, rel: str) -> list[tuple[str, os.stat_result]]:
    """(name, its own status, a link's and not its target's) of what the folder `rel`
    beneath `top` holds, by name."""
    fd = open_under(top, rel, folder=True) if _parts(rel) else os.dup(top)
    try:
        with os.scandir(fd) as found:
            return sorted((e.name, e.stat(follow_symlinks=False)) for e in found)
    finally:
        os.close(fd)


def _entry(top: int, rel: str, info: os.stat_result) -> Entry | None:
    kind = (
        "folder"
        if stat.S_ISDIR(info.st_mode)
        else "file"
        if stat.S_ISREG(info.st_mode)
        else "link"
        if stat.S_ISLNK(info.st_mode)
        else None
    )
    if kind is None:
        return None  # a device, a pipe, a socket: never kept
    target = ""
    if kind == "link":
        head, _, name = rel.rpartition("/")
        fd = open_under(top, head, folder=True) if _parts(head) else os.dup(top)
        try:
            target = os.readlink(name, dir_fd=fd)
        finally:
            os.close(fd)
    return Entry(
        rel=rel, kind=kind, mode=stat.S_IMODE(info.st_mode), mtime=info.st_mtime, target=target
    )


def tree(root: Path, rel: str) -> Iterator[Entry]:
    """`rel` beneath `root` and, for a folder, everything under it, in path order: folders,
    regular files and links (as links: never entered). Nothing if `rel` is not there."""
    top = open_folder(root)
    try:
        parts = _parts(rel)
        head = "/".join(parts[:-1])
        try:
            fd = open_under(top, head, folder=True) if head else os.dup(top)
        except FileNotFoundError:
            return
        try:
            info = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False) if parts else os.fstat(fd)
        except FileNotFoundError:
            return
        finally:
            os.close(fd)
        first = _entry(top, "/".join(parts), info)
        todo = [first] if first else []
        while todo:
            entry = todo.pop()
            yield entry
            if entry.kind != "folder":
                continue
            below = []
            for name, info in listing(top, entry.rel):
                child = _entry(top, f"{entry.rel}/{name}".lstrip("/"), info)
                if child:
                    below.append(child)
            todo.extend(reversed(below))
    finally:
        os.close(top)


def remove_owned(folders: tuple[str, ...], uid: int) -> int:
    """Delete what `uid` left in world-writable folders (`/tmp`, `/dev/shm`, ...), found by
    owner, never followed; returns how many entries went. Another project's step given the
    same user later finds nothing of this one's."""
    import shutil

    gone = 0
    for folder in folders:
        try:
            top = open_folder(Path(folder))
        except OSError:
            continue
        try:
            with os.scandir(top) as found:
                names = [e.name for e in found]
            for name in names:
                with contextlib.suppress(OSError):
                    info = os.stat(name, dir_fd=top, follow_symlinks=False)
                    if info.st_uid != uid:
                        continue
                    if stat.S_ISDIR(info.st_mode):
                        shutil.rmtree(name, dir_fd=top)  # by descriptors: links not followed
                    else:
                        os.unlink(name, dir_fd=top)
                    gone += 1
        finally:
            os.close(top)
    return gone
