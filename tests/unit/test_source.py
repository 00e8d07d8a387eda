from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cicd_ray.errors import SpecError
from cicd_ray.source import snapshot, unpack
from tests.builders import make_repo


def test_snapshot_is_deterministic_excludes_caches_and_unpacks(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("print(1)\n")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    (src / "node_modules").mkdir()
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    digest, data = snapshot(src, limit_bytes=10**6)
    assert snapshot(src, limit_bytes=10**6)[0] == digest
    dest = tmp_path / "out"
    unpack(data, dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "pkg",
        "pkg/a.py",
        "run.sh",
    ]
    assert (dest / "run.sh").stat().st_mode & 0o100


def test_snapshot_limits_and_missing_folder(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * 5000)
    with pytest.raises(SpecError, match="larger than the 1000 byte limit"):
        snapshot(tmp_path, limit_bytes=1000)
    with pytest.raises(SpecError, match="is not a directory"):
        snapshot(tmp_path / "nope", limit_bytes=1000)


def test_concurrent_unpacks_into_one_cache_folder_all_succeed(tmp_path):
    import threading

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    _, data = snapshot(tmp_path / "src", limit_bytes=10**6)
    dest = tmp_path / "cache" / "digest"
    errors = []

    def go():
        try:
            unpack(data, dest)
        except Exception as e:  # collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and (dest / "f").read_text() == "x"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["digest"]


def test_clone_checks_out_a_branch_or_a_tag(tmp_path):
    from cicd_ray.source import clone

    url = make_repo(tmp_path)
    clone(url, "main", tmp_path / "a")
    assert (tmp_path / "a" / "README").read_text() == "version two\n"
    clone(url, "v1", tmp_path / "b")
    assert (tmp_path / "b" / "README").read_text() == "version one\n"


def test_clone_of_a_missing_ref_says_so(tmp_path):
    from cicd_ray.errors import SourceError
    from cicd_ray.source import clone

    url = make_repo(tmp_path)
    with pytest.raises(SourceError, match=r"git could not fetch .* at nope"):
        clone(url, "nope", tmp_path / "c")


def _tgz(members: dict[str, bytes]) -> bytes:
    import gzip
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


def test_an_archive_bomb_is_refused_before_unpacking(tmp_path):
    import hashlib

    from cicd_ray.errors import SourceError
    from cicd_ray.source import check_archive, unpack

    bomb = _tgz({"zeros": b"\0" * (20 * 2**20)})
    assert len(bomb) < 64 * 1024  # a few KiB that claim 20 MiB
    with pytest.raises(SourceError, match="unpacks to more than 10485760 bytes"):
        unpack(bomb, tmp_path / "out", hashlib.sha256(bomb).hexdigest(), limit_bytes=10 * 2**20)
    assert not (tmp_path / "out").exists()
    many = _tgz({f"f{i}": b"" for i in range(50)})
    with pytest.raises(SourceError, match="more than 20 members"):
        check_archive(many, max_members=20)
    with pytest.raises(SourceError, match="does not match its digest"):
        unpack(many, tmp_path / "out", "0" * 64)
    with pytest.raises(SourceError, match=r"not a readable \.tar\.gz"):
        check_archive(b"not an archive")


def test_a_sparse_member_is_refused(tmp_path):
    from cicd_ray.errors import SourceError
    from cicd_ray.source import check_archive

    big = tmp_path / "hole"
    with big.open("wb") as f:
        f.truncate(2**40)  # a terabyte of nothing
    archive = tmp_path / "sparse.tgz"
    subprocess.run(
        ["tar", "--sparse", "-czf", str(archive), "-C", str(tmp_path), "hole"],
        check=True,
        timeout=120,
    )
    assert archive.stat().st_size < 4096
    with pytest.raises(SourceError, match="sparse"):
        check_archive(archive.read_bytes())


def test_clone_checks_out_a_commit_by_its_sha(tmp_path):
    from cicd_ray.source import clone

    url = make_repo(tmp_path)
    first = subprocess.run(
        ["git", "-C", str(tmp_path / "repo.git"), "rev-parse", "v1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    clone(url, first, tmp_path / "a")
    assert (tmp_path / "a" / "README").read_text() == "version one\n"
    clone(url, first[:12], tmp_path / "b")  # an abbreviated one too
    assert (tmp_path / "b" / "README").read_text() == "version one\n"


# docs/pipelines.md: ".git, .venv, venv, node_modules, __pycache__ and tool caches are left out".
DOCUMENTED_EXCLUSIONS = [
    ".git",
    ".hg",
    ".svn",
    ".venv",
    "venv",
    "node_modules",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".tox",
]


def test_snapshot_leaves_out_every_excluded_name_at_any_depth(tmp_path):
    src = tmp_path / "src"
    for name in DOCUMENTED_EXCLUSIONS:
        for parent in (src, src / "pkg" / "deep"):
            (parent / name).mkdir(parents=True, exist_ok=True)
            (parent / name / "inside").write_text("left out\n")
    (src / "pkg" / "deep" / "kept.txt").write_text("kept\n")
    (src / "gitignore-like.git").write_text("a file whose name only looks excluded\n")
    _, data = snapshot(src, limit_bytes=10**6)
    unpack(data, tmp_path / "out")
    assert sorted(
        p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")
    ) == ["gitignore-like.git", "pkg", "pkg/deep", "pkg/deep/kept.txt"]


def test_resolve_pins_a_branch_a_tag_head_or_a_sha_to_its_commit(tmp_path):
    from cicd_ray.errors import SourceError
    from cicd_ray.source import resolve

    url = make_repo(tmp_path)
    bare = tmp_path / "repo.git"
    sha = {
        ref: subprocess.run(
            ["git", "-C", str(bare), "rev-parse", f"{ref}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for ref in ("main", "v1")
    }
    assert resolve(url, "main") == resolve(url, "HEAD") == sha["main"]
    assert resolve(url, "v1") == sha["v1"]
    assert resolve(url, sha["v1"]) == resolve(url, sha["v1"][:7]) == sha["v1"]
    for missing in ("no-such-branch", "abcdef1"):
        with pytest.raises(SourceError, match=f"'{missing}' names no branch, tag or commit"):
            resolve(url, missing)


def test_resolve_ref_names_the_branch_a_ref_names_and_no_other(tmp_path):
    """What `if: run.branch == 'main'` reads: a branch, or the branch HEAD points at; a tag or
    a commit names none."""
    from cicd_ray.source import resolve_ref

    url = make_repo(tmp_path)
    main = resolve_ref(url, "main")
    assert main[1] == "main" and resolve_ref(url, "HEAD") == main
    assert resolve_ref(url, "v1")[1] == ""
    assert resolve_ref(url, main[0]) == (main[0], "")


def _links_archive(links: list[tuple[str, str, bytes | None]]) -> bytes:
    """A .tar.gz of (name, link target, data): a link when data is None, else a file."""
    import gzip
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, target, data in links:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = (
                    (tarfile.DIRTYPE, "") if target == "/" else (tarfile.SYMTYPE, target)
                )
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


def crafted_cve_2025_4517(target: Path) -> bytes:
    """The shape of CVE-2025-4517's archive (a 1.4 KB archive wrote a chosen absolute path as
    root on Python 3.11.7): a chain of links to folders with 247-character names, whose
    resolved path overflows PATH_MAX, so the `data` filter checks a path the kernel never
    uses; then a link through the chain and `..` to the target's folder, and a file through
    it."""
    long = "d" * 247
    steps = "abcdefghijklmnop"
    members, path = [], ""
    for step in steps:
        members.append((f"{path}{long}", "/", None))  # a folder
        members.append((f"{path}{step}", long, None))
        path = f"{path}{long}/"
    chain = "/".join(steps)
    members.append((chain, "../" * len(steps), None))
    members.append(("escape", f"{chain}/" + "../" * 32 + str(target.parent).lstrip("/"), None))
    members.append((f"escape/{target.name}", "", b"written as root"))
    return _links_archive(members)


def test_a_crafted_archive_is_refused_before_anything_is_unpacked(tmp_path):
    """Issue 24, item 2: links out of the folder and overlong names are refused by
    check_archive, whatever Python's own filter would have made of them."""
    from cicd_ray.errors import SourceError
    from cicd_ray.source import check_archive, unpack

    target = tmp_path / "outside" / "pwned"
    target.parent.mkdir()
    crafted = crafted_cve_2025_4517(target)
    assert len(crafted) < 2048
    with pytest.raises(SourceError, match=r"over 1024 bytes|over 255 bytes|leaves the folder"):
        check_archive(crafted)
    with pytest.raises(SourceError):
        unpack(crafted, tmp_path / "out")
    assert not target.exists() and not (tmp_path / "out").exists()
    for members, problem in [
        ([("up", "../../etc", None)], r"link target '../../etc' leaves the folder"),
        ([("abs", "/etc/passwd", None)], r"link target '/etc/passwd' leaves the folder"),
        ([("a/../../x", "", b"x")], r"name 'a/../../x' leaves the folder"),
        ([("n" * 256, "", b"x")], "has a name over 255 bytes"),
        ([("/".join(["n" * 200] * 6), "", b"x")], "is over 1024 bytes"),
    ]:
        with pytest.raises(SourceError, match=problem):
            check_archive(_links_archive(members))
    fine = _links_archive([("dir", "/", None), ("dir/f", "", b"ok"), ("dir/l", "f", None)])
    unpack(fine, tmp_path / "fine")
    assert (tmp_path / "fine" / "dir" / "l").read_text() == "ok"


@pytest.mark.skipif(os.geteuid() != 0, reason="root unpacks as nobody; CI runs as root")
def test_a_root_worker_unpacks_as_nobody_and_keeps_the_files_as_root(tmp_path):
    from cicd_ray.source import unpack

    _, data = snapshot(_tree(tmp_path / "src"), limit_bytes=10**6)
    dest = tmp_path / "out"
    unpack(data, dest)
    owners = {p.lstat().st_uid for p in [dest, *dest.rglob("*")]}
    assert owners == {0} and (dest / "pkg" / "a.py").read_text() == "print(1)\n"


def _tree(src: Path) -> Path:
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("print(1)\n")
    (src / "link").symlink_to("pkg/a.py")
    return src


def test_git_sources_through_the_api_name_public_hosts_only(tmp_path, monkeypatch):
    """Issue 24, item 13: any host and `file://` were accepted through the API, fetched as
    root; git ran with no transport limits and unbounded output on the master."""
    from cicd_ray.config import Settings
    from cicd_ray.errors import SourceError
    from cicd_ray.master.admission import git_source_problems
    from cicd_ray.master.core import MasterCore
    from cicd_ray.source import hardening, resolve_ref
    from cicd_ray.store.memory import MemoryStore

    url = make_repo(tmp_path)
    assert git_source_problems(url, []) == [
        f"source.git: {url}: local repositories are not accepted through the API "
        "(CICD_RAY_GIT_ALLOW=file allows them)"
    ]
    assert git_source_problems(url, ["file"]) == []
    for internal in (
        "https://127.0.0.1/a.git",
        "ssh://git@10.1.2.3:2222/a.git",
        "git@localhost:a.git",
        "https://[64:ff9b::a9fe:a9fe]/a.git",
    ):
        [problem] = git_source_problems(internal, [])
        assert "loopback or private address" in problem and "CICD_RAY_GIT_ALLOW" in problem
    assert git_source_problems("https://127.0.0.1/a.git", ["127.0.0.1"]) == []
    assert git_source_problems("https://8.8.8.8/a.git", []) == []
    core = MasterCore(Settings(home=tmp_path / "home"), MemoryStore(), clock=lambda: 0.0)
    doc = {
        "name": "g",
        "source": {"git": url, "ref": "main"},
        "steps": [{"name": "a", "run": "true"}],
    }
    assert "not accepted through the API" in core.submissions.plan(doc, from_api=True).problems[0]
    assert (
        core.submissions.plan(doc).problems == []
    )  # the cluster's own caller (run --address, a job)
    assert hardening("https://h/a.git")[:2] == ["-c", "protocol.file.allow=never"]
    assert "protocol.ext.allow=never" in hardening(url)
    monkeypatch.setattr("cicd_ray.source.MAX_GIT_OUTPUT_BYTES", 40)
    with pytest.raises(SourceError, match=r"printed \d+ bytes, more than the 40 accepted"):
        resolve_ref(url, "HEAD")


@pytest.mark.skipif(os.geteuid() != 0, reason="a step's user exists for root; CI runs as root")
def test_a_network_repository_is_cloned_as_the_step_s_user(tmp_path):
    """Issue 24, item 13: cloned as root before; now nothing of it is written as root."""
    import socket
    import time

    from cicd_ray.source import clone

    url = make_repo(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = url.removeprefix("file://").rsplit("/", 1)[0]
    daemon = subprocess.Popen(
        [
            "git",
            "daemon",
            "--reuseaddr",
            "--export-all",
            f"--base-path={base}",
            f"--port={port}",
            "--listen=127.0.0.1",
            base,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        dest, home = Path("/var/tmp") / f"cicd-clone-{os.getpid()}", tmp_path / "h"
        for folder in (dest, home):
            folder.mkdir()
            os.chown(folder, 211000, 211000)
        for _ in range(50):  # the daemon takes a moment to listen
            try:
                clone(f"git://127.0.0.1:{port}/repo.git", "v1", dest, uid=211000, home=home)
                break
            except Exception:
                time.sleep(0.1)
        owners = {p.lstat().st_uid for p in [dest, *dest.rglob("*")]}
        assert owners == {211000} and (dest / "README").read_text() == "version one\n"
    finally:
        daemon.kill()
        daemon.wait()
        subprocess.run(["rm", "-rf", f"/var/tmp/cicd-clone-{os.getpid()}"], check=False)
