"""A step's files: the artifacts it keeps (found by pattern, read without following a link) and
the artifacts of its needs placed in its workspace.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from cicd_ray.records import ArtifactFile, ArtifactInput
from cicd_ray.store.blobs import ArtifactError, ArtifactStore
from cicd_ray.worker import beneath


def glob_match(pattern: str, path: str) -> bool:
    """Whether `path` (relative, with /) matches `pattern`: `**` any number of folders, `*`,
    `?` and `[...]` within one name. Name by name, each with fnmatch (whose patterns cannot
    backtrack without end), and the folders by a table: a hostile pattern costs a few
    microseconds, not minutes."""
    want = [p for p in pattern.strip("/").split("/") if p]
    have = path.split("/")
    # reach[j]: the first i names of the pattern can match the first j names of the path.
    reach = [True] + [False] * len(have)
    for part in want:
        if part == "**":
            for j in range(1, len(have) + 1):
                reach[j] = reach[j] or reach[j - 1]
        else:
            reach = [False] + [
                reach[j] and fnmatch.fnmatchcase(have[j], part) for j in range(len(have))
            ]
    return reach[-1]


def could_hold(pattern: str, folder: str) -> bool:
    """Whether something under `folder` (relative, with /) could match `pattern`: the walk
    enters only such folders (`dist/**` never reads node_modules)."""
    want = [p for p in pattern.strip("/").split("/") if p]
    for i, name in enumerate(folder.split("/")):
        if i >= len(want):
            return False
        if want[i] == "**":
            return True
        if not fnmatch.fnmatchcase(name, want[i]):
            return False
    return True


def matching(root: Path, patterns: list[str]) -> Iterator[tuple[str, Callable[[], BinaryIO]]]:
    """(relative path, opener) of the regular files under `root` that a pattern names,
    directly or through a folder it names (`dist` and `dist/**` both give every file under
    dist), in path order. Links are neither followed nor kept: `root` and every name under it
    are opened one at a time without following a link (`beneath`), so a step that swapped a
    folder for a link to `/` hands over nothing outside its workspace."""
    top = beneath.open_folder(root)
    try:
        todo = [("", False)]  # a folder's relative path, whether a pattern named it
        while todo:
            rel_folder, named = todo.pop()
            below = []
            for name, info in beneath.listing(top, rel_folder):
                rel = f"{rel_folder}{name}"
                if stat.S_ISDIR(info.st_mode):
                    inside = named or any(glob_match(p, rel) for p in patterns)
                    if inside or any(could_hold(p, rel) for p in patterns):
                        below.append((rel + "/", inside))
                elif stat.S_ISREG(info.st_mode) and (
                    named or any(glob_match(p, rel) for p in patterns)
                ):
                    yield rel, functools.partial(_open_regular, root, rel)
            todo.extend(reversed(below))
    finally:
        os.close(top)


def keep(
    store: ArtifactStore, workspace: Path, patterns: list[str], max_bytes: int, room_bytes: int
) -> list[ArtifactFile]:
    """Store the files the patterns match; raises ArtifactError (naming the file and the
    limit) when one is larger than `max_bytes` or all are larger than `room_bytes`."""
    try:
        files = list(matching(workspace, patterns))
    except beneath.LinkRefused as e:
        raise ArtifactError(f"artifacts: {e}") from None
    total = 0
    for rel, opener in files:
        with opener() as src:
            size = os.fstat(src.fileno()).st_size
        total += size
        if size > max_bytes:
            raise ArtifactError(
                f"artifact {rel} is {size} bytes, more than the {max_bytes} "
                "allowed for one (CICD_RAY_ARTIFACT_MAX_BYTES)"
            )
        if total > room_bytes:
            raise ArtifactError(
                f"the artifacts reach {total} bytes at {rel}, more than the "
                f"{room_bytes} left for this run (CICD_RAY_ARTIFACT_RUN_MAX_BYTES)"
            )
    kept = []
    for rel, opener in files:
        with opener() as src:
            digest = store.put(src)
            kept.append(ArtifactFile(path=rel, size=os.fstat(src.fileno()).st_size, digest=digest))
    return kept


def _open_regular(root: Path, rel: str) -> BinaryIO:
    """The file, if it is still a regular file reached through no link (not swapped since it
    was found)."""
    try:
        return beneath.open_file(root, rel)
    except beneath.LinkRefused as e:
        raise ArtifactError(f"artifact {e}") from None
    except OSError as e:
        raise ArtifactError(f"artifact {rel}: {e.strerror}") from None


def place_inputs(store: ArtifactStore, inputs: list[ArtifactInput], workspace: Path) -> list[str]:
    """Put the needs' artifacts in the workspace at their paths; the log lines saying so."""
    lines = []
    for given in inputs:
        size = 0
        for f in given.files:
            dest = workspace / f.path
            if not dest.resolve().is_relative_to(workspace.resolve()):
                raise ArtifactError(
                    f"artifact path {f.path!r} of {given.step} leaves the workspace"
                )
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            store.fetch(f.digest, dest)
            size += f.size
        if given.files:
            lines.append(
                f"[cicd-ray] artifacts of {given.step}: {len(given.files)} file(s), {size} bytes\n"
            )
    return lines
