"""Files and processes as another user: a folder only its owner can enter, a tree handed to a
user, a command run as one (through `setpriv`, a cheap vfork+exec).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

SETPRIV = shutil.which("setpriv")  # util-linux: drops to a user after a cheap vfork+exec


def as_user(uid: int, argv: list[str]) -> list[str]:
    """`argv` run as `uid` (its group alone) through setpriv; where setpriv is not there,
    Popen drops to the user itself (`popen_user`)."""
    if SETPRIV is None:
        return argv
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]


def popen_user(uid: int | None) -> dict:
    """Popen's own way to drop to `uid`, where setpriv is not there (a full fork of the
    worker, slower than setpriv's vfork: docs/benchmarks.md)."""
    if uid is None or SETPRIV is not None:
        return {}
    return {"user": uid, "group": uid, "extra_groups": [], "umask": 0o077}


def private_folder(path: Path) -> Path:
    """`path` made, with every folder above it that is not there yet, 0700: the worker's
    alone (CICD_RAY_HOME, the store's and the artifacts' folders; `mkdir(parents=True,
    mode=...)` gives the parents it makes the umask's 0755)."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            folder.mkdir(mode=0o700)
    return path


def chown_tree(folder: Path, uid: int) -> None:
    """`folder` and all under it to `uid` (and its group), links changed themselves, never
    followed: only for a tree no process of another user is changing now."""
    for top, dirs, files in os.walk(folder):
        os.lchown(top, uid, uid)
        for name in (*dirs, *files):
            os.lchown(os.path.join(top, name), uid, uid)
