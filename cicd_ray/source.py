"""Source snapshots: a directory packed at submission, unpacked into every step's workspace.

The archive is content-addressed (its SHA-256), so a worker unpacks each snapshot once and
copies it per attempt, and resubmitting an unchanged tree stores nothing new.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from cicd_ray.errors import SourceError, SpecError
from cicd_ray.ownership import as_user, chown_tree, popen_user

GIT_TIMEOUT_S = 600.0  # a clone on a worker
LOOKUP_TIMEOUT_S = 60.0  # a ref looked up, a file read (on the master, at submission)
MAX_GIT_OUTPUT_BYTES = 16 * 1024 * 1024  # what git may print (a ref list, a file) before it
# is refused: a server's 177 MiB ref list took the master to 783 MiB

# Never worth copying into a build: version control, virtual environments, caches.
EXCLUDED_NAMES = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "venv",
        "__pycache__",
        ".pytest_cache",
        ".ruff_cache",
        ".mypy_cache",
        "node_modules",
        ".tox",
    }
)


def snapshot(directory: str | Path, limit_bytes: int) -> tuple[str, bytes]:
    """Pack `directory` into a gzip'd tar; return (sha256 hex, archive bytes)."""
    root = Path(directory)
    if not root.is_dir():
        raise SpecError([f"source: {str(directory)!r} is not a directory"])
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(_walk(root)):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isfile():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            if raw.tell() > limit_bytes:
                raise SpecError(
                    [
                        f"source: {root} is larger than the {limit_bytes} byte limit; "
                        "exclude build outputs or point source at a smaller folder"
                    ]
                )
    data = gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)
    return hashlib.sha256(data).hexdigest(), data


def source_folder(
    spec_source: object, pipeline_dir: Path, override: str | Path | None = None
) -> Path | None:
    """The folder to snapshot: an explicit override, else the pipeline's `source:` folder
    (relative to the pipeline file), else none (no source, or a git source the workers clone)."""
    if override is not None:
        return Path(override)
    return pipeline_dir / spec_source if isinstance(spec_source, str) else None


def clone(
    url: str,
    ref: str,
    dest: Path,
    timeout_s: float = GIT_TIMEOUT_S,
    uid: int | None = None,
    home: Path | None = None,
) -> None:
    """Clone `url` into `dest` (empty) and check out `ref` (a branch, tag or commit): as the
    step's user `uid` when it has one (with `home` as its HOME), so nothing the repository
    holds (a hook, a submodule, a link) is written or read as root."""
    run = {"uid": uid, "home": home}
    _git(["clone", "--quiet", "--", url, str(dest)], url, ref, timeout_s, **run)
    if COMMIT.match(ref) and not _has(str(dest), ref, **run):
        # A commit on no branch (a fork's pull request: the host keeps it under
        # refs/pull/N/head): fetched by its SHA.
        _git(["-C", str(dest), "fetch", "--quiet", "origin", ref], url, ref, timeout_s, **run)
    _git(["-C", str(dest), "checkout", "--quiet", "--detach", ref], url, ref, timeout_s, **run)


COMMIT = re.compile(r"^[0-9a-f]{40}$")
ABBREVIATED = re.compile(r"^[0-9a-fA-F]{4,40}$")


def resolve(url: str, ref: str, timeout_s: float = LOOKUP_TIMEOUT_S) -> str:
    """The commit SHA `ref` names in `url` now (see `resolve_ref`)."""
    return resolve_ref(url, ref, timeout_s)[0]


def resolve_ref(url: str, ref: str, timeout_s: float = LOOKUP_TIMEOUT_S) -> tuple[str, str]:
    """The commit SHA `ref` names in `url` now, and the branch it names ("" for a tag or a
    commit; HEAD names the branch it points at). The run is pinned to that commit, so every
    step and retry builds the same one however the branch moves. A branch, tag or HEAD is looked
    up with `git ls-remote` (no clone); an abbreviated or full SHA by fetching the history's
    commits only (no trees, no files). Raises SourceError when it names no commit."""
    listing = _git(["ls-remote", "--symref", "--", url, ref, f"{ref}^{{}}"], url, ref, timeout_s)
    lines = [line.split("\t", 1) for line in listing.splitlines() if "\t" in line]
    found = {name: value for value, name in lines if not value.startswith("ref: ")}
    # With --symref, "ref: refs/heads/main<TAB>HEAD" says which branch HEAD is.
    head = next((v for v, name in lines if name == "HEAD" and v.startswith("ref: ")), "")
    for name in ("HEAD", f"refs/heads/{ref}", f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}", ref):
        if name == "HEAD" and ref != "HEAD":
            continue
        if COMMIT.match(found.get(name, "")):
            if name == "HEAD":
                return found[name], head.removeprefix("ref: refs/heads/") if head.startswith(
                    "ref: refs/heads/"
                ) else ""
            return found[name], ref if name == f"refs/heads/{ref}" else ""
    if ABBREVIATED.match(ref):
        with tempfile.TemporaryDirectory(prefix="cicd-resolve-") as tmp:
            _git(["init", "--quiet", "--bare", tmp], url, ref, timeout_s)
            _git(
                [
                    "-C",
                    tmp,
                    "fetch",
                    "--quiet",
                    "--filter=tree:0",
                    "--",
                    url,
                    "+refs/heads/*:refs/heads/*",
                    "+refs/tags/*:refs/tags/*",
                ],
                url,
                ref,
                timeout_s,
            )
            sha = _git(
                ["-C", tmp, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                url,
                ref,
                timeout_s,
                check=False,
            ).strip()
            if COMMIT.match(sha):
                return sha, ""
    raise SourceError(f"{ref!r} names no branch, tag or commit of {url}")


def file_at(
    url: str, commit: str, path: str, limit_bytes: int, timeout_s: float = LOOKUP_TIMEOUT_S
) -> str:
    """The text of the file `path` in `url` at `commit` (a full SHA): fetched alone where the
    host serves a commit by its SHA, else with the branches' history. SourceError when the
    commit or the file is not there, or the file is over `limit_bytes`."""
    with tempfile.TemporaryDirectory(prefix="cicd-file-") as tmp:
        _git(["init", "--quiet", "--bare", tmp], url, commit, timeout_s)
        _git(
            ["-C", tmp, "fetch", "--quiet", "--depth=1", "--", url, commit],
            url,
            commit,
            timeout_s,
            check=False,
        )
        if not _has(tmp, commit):
            _git(
                [
                    "-C",
                    tmp,
                    "fetch",
                    "--quiet",
                    "--",
                    url,
                    "+refs/heads/*:refs/heads/*",
                    "+refs/pull/*/head:refs/pull/*",
                    "+refs/merge-requests/*/head:refs/mr/*",
                ],
                url,
                commit,
                timeout_s,
                check=False,
            )
            if not _has(tmp, commit):
                raise SourceError(f"{url} has no commit {commit}")
        size = _git(
            ["-C", tmp, "cat-file", "-s", f"{commit}:{path}"], url, commit, timeout_s, check=False
        ).strip()
        if not size.isdigit():
            raise SourceError(f"{url} has no file {path} at commit {commit[:12]}")
        if int(size) > limit_bytes:
            raise SourceError(
                f"{path} at commit {commit[:12]} is {size} bytes, more than the "
                f"{limit_bytes} byte limit (CICD_RAY_MAX_PIPELINE_BYTES)"
            )
        return _git(["-C", tmp, "show", f"{commit}:{path}"], url, commit, timeout_s)


def _has(repo: str, commit: str, uid: int | None = None, home: Path | None = None) -> bool:
    try:
        _git(
            ["-C", repo, "cat-file", "-e", f"{commit}^{{commit}}"],
            repo,
            commit,
            LOOKUP_TIMEOUT_S,
            uid=uid,
            home=home,
        )
    except SourceError:
        return False
    return True


def hardening(url: str) -> list[str]:
    """git's own settings for every command: no `ext::` transport, and no local files (a
    submodule or a redirect pointing at the machine's own repositories) unless the URL is
    itself a local one an operator allowed."""
    local = "always" if url.startswith("file://") else "never"
    return ["-c", f"protocol.file.allow={local}", "-c", "protocol.ext.allow=never"]


def _git(
    args: list[str],
    url: str,
    ref: str,
    timeout_s: float,
    check: bool = True,
    uid: int | None = None,
    home: Path | None = None,
) -> str:
    """Run git (as `uid`, when given) and return what it printed: at most
    MAX_GIT_OUTPUT_BYTES, kept in a file meanwhile, so a hostile server's flood costs disk
    for a moment, never the caller's memory."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # never wait for a password
    if home is not None:
        env["HOME"] = str(home)
    command = ["git", *hardening(url), *args]
    try:
        with tempfile.TemporaryFile() as out:
            done = subprocess.run(
                as_user(uid, command) if uid is not None else command,
                stdout=out,
                stderr=subprocess.PIPE,
                timeout=timeout_s,
                env=env,
                **popen_user(uid),
            )
            size = out.tell()
            out.seek(0)
            printed = out.read(MAX_GIT_OUTPUT_BYTES).decode(errors="replace")
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceError(f"`git {args[0]}` did not finish: {e}") from None
    if size > MAX_GIT_OUTPUT_BYTES:
        raise SourceError(
            f"`git {args[0]}` of {url} printed {size} bytes, more than the "
            f"{MAX_GIT_OUTPUT_BYTES} accepted"
        )
    if done.returncode != 0 and check:
        raise SourceError(
            f"git could not fetch {url} at {ref}: "
            f"{done.stderr.decode(errors='replace').strip()[-1000:]}"
        )
    return printed


def _walk(root: Path):
    for path in root.iterdir():
        if path.name in EXCLUDED_NAMES:
            continue
        yield path
        if path.is_dir() and not path.is_symlink():
            yield from _walk(path)


SOURCE_LIMIT_BYTES = 200 * 1024 * 1024  # the most a packed source may be
DEFAULT_UNPACKED_LIMIT_BYTES = 2 * 1024 * 1024 * 1024
DEFAULT_MAX_MEMBERS = 100_000


MAX_NAME_BYTES = 255  # one name of a path (NAME_MAX)
MAX_PATH_BYTES = 1024  # a member's whole path, or a link's target


def member_problem(member: tarfile.TarInfo) -> str:
    """Why a member may not be unpacked, or "". Checked before anything is extracted and
    whatever Python's own filter says: a link may not point out of the folder (absolute, or
    through `..`), and no name may be long enough to overflow a path (CVE-2025-4517: on
    Pythons before 3.11.13, a chain of links with 247-character names defeats tarfile's
    `data` filter)."""
    name = member.name
    if member.issparse():
        return f"{name!r} is a sparse file; sparse members are not accepted"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return f"{name[:80]!r} is a device, pipe or other special file"
    for label, path in (("name", name), ("link target", member.linkname)):
        if len(path.encode()) > MAX_PATH_BYTES:
            return f"{name[:80]!r}: its {label} is over {MAX_PATH_BYTES} bytes"
        if any(len(part.encode()) > MAX_NAME_BYTES for part in path.split("/")):
            return f"{name[:80]!r}: its {label} has a name over {MAX_NAME_BYTES} bytes"
        if path.startswith("/") or ".." in path.split("/"):
            return f"{name[:80]!r}: its {label} {path[:80]!r} leaves the folder (absolute, or ..)"
    return ""


def check_archive(
    data: bytes,
    limit_bytes: int = DEFAULT_UNPACKED_LIMIT_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> list[tarfile.TarInfo]:
    """The archive's members, once it is known to unpack within bounds: a gzip'd tar of a few
    hundred bytes can claim a terabyte (a sparse member) or expand a thousandfold. Reads the
    headers only (the data is streamed past, never held). Raises SourceError naming the limit."""
    members: list[tarfile.TarInfo] = []
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar:
                problem = member_problem(member)
                if problem:
                    raise SourceError(f"source archive: {problem}")
                total += member.size
                members.append(member)
                if len(members) > max_members:
                    raise SourceError(f"source archive: more than {max_members} members")
                if total > limit_bytes:
                    raise SourceError(
                        f"source archive: unpacks to more than {limit_bytes} "
                        "bytes (CICD_RAY_SOURCE_UNPACKED_LIMIT_BYTES)"
                    )
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SourceError(f"source archive: not a readable .tar.gz ({e})") from None
    return members


def unpack(
    data: bytes,
    dest: Path,
    digest: str | None = None,
    limit_bytes: int = DEFAULT_UNPACKED_LIMIT_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> None:
    """Unpack an archive made by `snapshot` into `dest`, atomically, once its digest (if given)
    matches and it is known to fit (`check_archive`).

    Several workers on a node share one cache folder: each unpacks into a folder of its own and
    renames it into place; whoever loses the race drops its copy. Every member was checked
    (`member_problem`); the "data" filter refuses members that would land outside the folder
    as well. A root worker unpacks as an unprivileged user (`unpack_as_nobody`), so an archive
    that got past both still writes nowhere that user could not.
    """
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise SourceError(f"source snapshot {digest[:12]}: its content does not match its digest")
    check_archive(data, limit_bytes, max_members)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        if os.geteuid() == 0:
            unpack_as_nobody(data, tmp)
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
                tar.extractall(tmp, filter="data")
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


NOBODY = 65534  # the unprivileged user a root worker unpacks sources as
UNPACK_TIMEOUT_S = 600.0


def unpack_as_nobody(data: bytes, folder: Path) -> None:
    """Unpack a checked archive into `folder` (new, empty, root's) as `nobody` with the
    system's tar, then give the files to root: made by a user who can write nowhere else, and
    taken back with lchown (no link followed) once that user's tar has ended."""
    os.chown(folder, NOBODY, NOBODY)
    try:
        done = subprocess.run(
            as_user(
                NOBODY,
                [
                    "tar",
                    "--extract",
                    "--gzip",
                    "--file=-",
                    "--no-same-owner",
                    "--no-same-permissions",
                ],
            ),
            # Entered as root before the user drops: the folders above may be closed to it.
            cwd=folder,
            input=data,
            capture_output=True,
            timeout=UNPACK_TIMEOUT_S,
            **popen_user(NOBODY),
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceError(f"source archive: tar did not finish: {e}") from None
    finally:
        chown_tree(folder, 0)  # nobody's tar has ended: nothing moves under it
    if done.returncode != 0:
        raise SourceError(
            "source archive: tar could not unpack it: "
            f"{done.stderr.decode(errors='replace').strip()[-300:]}"
        )
