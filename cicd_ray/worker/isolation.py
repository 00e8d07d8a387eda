"""What keeps a step in its place: a user of its own, limits, and an end that comes with the
step's or the worker's.

When the worker runs as root (the KubeRay image, `cicd-ray up` as root), every attempt runs as
a numeric user of its own, taken from a range (`CICD_RAY_STEP_UIDS`, default 200000-201023)
and held by a lock file for the attempt's life, so no two steps on a machine share one. Such a
user owns nothing but its attempt's folder (0700): it cannot read the worker's environment in
/proc, root's files (Ray's token in ~/.ray), the store, or another attempt's workspace. No
passwd entry is needed; `USER` and `HOME` are set for the step.

Every attempt's bash (the leader of its process group) runs a few lines before the script
(`PREAMBLE`): it sets the limits (address space from the step's memory, and for a user of its
own the number of processes). At the end of an attempt with a user of its own, every process
of that user is killed, `setsid` escapees included. When a worker dies, even by SIGKILL, Ray
kills its child processes (the steps' process groups), and every other worker on the machine
sweeps up, every few seconds, the processes of step users that no attempt holds: no step runs
on as an orphan.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import signal
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cicd_ray.errors import IsolationError
from cicd_ray.ownership import SETPRIV, as_user, chown_tree
from cicd_ray.worker.beneath import remove_owned

LOCK_DIR = Path("/run/cicd-ray/step-uids")  # one per machine, whatever CICD_RAY_HOME is


STEP_ROOT = Path("/var/tmp/cicd-ray-steps")  # attempts' folders: entered, never listed


MAX_PROCESSES = 1024  # RLIMIT_NPROC of a step with a user of its own


MIN_ADDRESS_SPACE_MB = 8192  # a JVM or node.js reserves gigabytes it never touches


ADDRESS_SPACE_PER_MEMORY = 16  # address space allowed per MiB of memory_mb


# The first lines of every step's bash, before it sources the script (`$0`, so errors name
# the script and its lines as before): the limits, and for a user of its own, the end of
# every process of that user when the step starts (an attempt of a worker that died may have
# left some, whose own end would otherwise kill this step) and when it ends. Arguments: the
# address space limit in KiB (0: none), the process limit (0: none), and "uid" when the
# attempt has a user of its own.
# `kill -KILL -1` is only ever sent by a step user: it reaches that user's processes alone.
# (No watcher process on the worker's life: a background process per step doubled the cost of
# a step on a loaded machine; Ray kills a dead worker's children, and `sweep` the rest.)
PREAMBLE = r"""
if [ "$3" = uid ]; then
  kill -KILL -1 2>/dev/null || true
  umask 077
  trap 'kill -KILL -1 2>/dev/null || true' EXIT
fi
ulimit -c 0
[ "$1" = 0 ] || ulimit -v "$1" || exit 125
[ "$2" = 0 ] || ulimit -u "$2" || exit 125
shift 3
. "$0"
"""


def command(script: str, memory_mb: int, uid: int | None) -> list[str]:
    """How a step's bash is started: as `uid` (setpriv, when it is there) with the preamble,
    in a PID namespace of its own where the machine allows one (`pid_namespaces`)."""
    bash = [
        "bash",
        "-e",
        "-o",
        "pipefail",
        "-c",
        PREAMBLE,
        script,
        str(address_space_kib(memory_mb)),
        str(MAX_PROCESSES if uid is not None else 0),
        "uid" if uid is not None else "shared",
    ]
    if uid is None:
        return bash
    return [*UNSHARE, *as_user(uid, bash)] if pid_namespaces() else as_user(uid, bash)


# A PID namespace (and a /proc of its own) per step: it sees only its own processes, not
# another project's command lines (`--password=...`); when its bash ends, every process in it
# ends with it, `setsid` escapees too. --kill-child: a worker killed takes the step along.
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--"]


@functools.lru_cache(maxsize=1)
def pid_namespaces() -> bool:
    """Whether steps get a PID namespace each: root with setpriv and util-linux's unshare,
    allowed to make namespaces (a Kubernetes pod without CAP_SYS_ADMIN is not)."""
    if os.geteuid() != 0 or SETPRIV is None or shutil.which("unshare") is None:
        return False
    try:
        done = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@dataclass
class Identity:
    """The user an attempt runs as, held (by its lock) until `release`."""

    uid: int
    lock_fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)


def isolating(uids: range | None) -> bool:
    return uids is not None and os.geteuid() == 0


def describe(uids: range | None) -> str:
    """How this process's steps are kept apart, for `cicd-ray workers` and the API."""
    if isolating(uids):
        hidden = ", a PID namespace per step" if pid_namespaces() else ""
        return f"a user per step ({uids.start}-{uids.stop - 1}{hidden})"
    if os.geteuid() == 0:
        return "none: CICD_RAY_STEP_UIDS=off, steps run as root"
    return "shared: the worker is not root, steps run as its user"


def _try_lock(uid: int) -> int | None:
    """The lock of a step user, if no attempt on this machine holds it now."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(LOCK_DIR / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def take_identity(uids: range, project: str = "default") -> Identity:
    """A user id of the range that no other attempt on this machine holds now, and that no
    other project's step has used on it: each lock file names the project whose user it is,
    so a uid, once a project's, stays that project's (what one project's step left behind
    under its uid, another's never runs as). The scan starts at a place of the project's
    own, where its users gather. Only when every free user is another project's is one taken
    over: everything it owns in the shared places is deleted first."""
    count = len(uids)
    start = int(hashlib.sha256(project.encode()).hexdigest()[:8], 16) % count
    spare = None
    for i in range(count):
        uid = uids[(start + i) % count]
        fd = _try_lock(uid)
        if fd is None:
            continue
        owner = os.pread(fd, 128, 0).decode(errors="replace")
        if owner in ("", project):
            if owner == "":
                os.pwrite(fd, project.encode(), 0)
            if spare is not None:
                os.close(spare[1])
            return Identity(uid=uid, lock_fd=fd)
        if spare is None:
            spare = (uid, fd)
        else:
            os.close(fd)
    if spare is None:
        raise IsolationError(f"all {count} step users of CICD_RAY_STEP_UIDS are in use")
    uid, fd = spare
    kill_user(uid)
    clean_user(uid)
    os.ftruncate(fd, 0)
    os.pwrite(fd, project.encode(), 0)
    return Identity(uid=uid, lock_fd=fd)


# What every user may write to: what a step leaves there (a file in /dev/shm, a socket in
# /tmp) is deleted when its attempt ends.
SHARED_PLACES = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")


def clean_user(uid: int) -> int:
    """Delete what `uid` owns at the top of the shared places (found by owner, removed
    through descriptors, no link followed); how many entries went."""
    return remove_owned(SHARED_PLACES, uid)


SWEEP_INTERVAL_S = 5.0  # one sweep per machine this often, whichever worker gets to it


SWEEP_STAMP = LOCK_DIR / "swept"


def sweep_due(now: float) -> bool:
    """Whether this worker should sweep now: the machine's last sweep, by any worker, is older
    than SWEEP_INTERVAL_S (a stamp file's time); if so, the stamp is this worker's."""
    try:
        if now - SWEEP_STAMP.stat().st_mtime < SWEEP_INTERVAL_S:
            return False
    except FileNotFoundError:
        LOCK_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    SWEEP_STAMP.touch()
    os.utime(SWEEP_STAMP, (now, now))
    return True


def sweep(uids: range) -> int:
    """Kill the processes of step users that no attempt holds: what was left when a worker
    died (Ray kills a dead worker's children, but not what left their process group, nor, off
    Ray, anything at all). Returns how
    many processes it killed."""
    import psutil

    found: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["uids", "status"]):
        ids = proc.info["uids"]
        if ids and ids.real in uids and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.setdefault(ids.real, []).append(proc.pid)
    killed = 0
    for uid, pids in found.items():
        fd = _try_lock(uid)
        if fd is None:
            continue  # an attempt runs as this user now: its processes are its own
        try:
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
        finally:
            os.close(fd)
    return killed


HANDED_OVER = ("ws", "home", "tmp")  # what of an attempt's folder is the step user's


def hand_over(root: Path, uid: int) -> None:
    """Make the attempt's ws/, home/ and tmp/ the step user's own, and nobody else's. The
    attempt's folder itself stays root's (read and entered by the step's group alone, 0750:
    its tar opens it to restore caches), so the step cannot put a link where `ws` was: what
    the worker reads after the step starts from a folder the step could not change
    (`beneath`)."""
    os.chown(root, 0, uid)
    root.chmod(0o750)
    for top in HANDED_OVER:
        chown_tree(root / top, uid)  # before the step: nothing moves under it yet
        (root / top).chmod(0o700)


def open_for_steps(folder: Path) -> None:
    """`folder` and the step root above it: root's, entered by anyone (to reach an attempt's
    own folder), listed by no one else (0711)."""
    for path in (STEP_ROOT, folder):
        path.mkdir(parents=True, exist_ok=True)
        # /var/tmp is everyone's: a folder someone else made there (or a link) is refused.
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
            raise IsolationError(
                f"{path} is not a folder of the worker's own (a link, or "
                f"owned by uid {st.st_uid}): remove it"
            )
        if st.st_mode & 0o777 != 0o711:
            path.chmod(0o711)
        if path == folder:
            break


@functools.lru_cache(maxsize=8)
def usable_by_others(path: str | Path) -> bool:
    """Whether a user with no rights of its own can run `path` (every folder above it can be
    entered, the file itself executed): a Python under /root (pyenv) cannot be."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & 0o001:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in real.parents)
    except OSError:
        return False


def python_warning(uids: range | None) -> str | None:
    """What to tell a root user whose steps will not find the worker's Python."""
    import sys

    if not isolating(uids) or usable_by_others(sys.executable):
        return None
    return (
        f"steps run as users of their own, who cannot run this Python "
        f"({os.path.realpath(sys.executable)}: a folder above it is closed to other "
        "users); `python` in a step finds the system's, if any. Install Python where "
        "every user can read it, or set CICD_RAY_STEP_UIDS=off to run steps as root."
    )


def address_space_kib(memory_mb: int) -> int:
    return max(memory_mb * ADDRESS_SPACE_PER_MEMORY, MIN_ADDRESS_SPACE_MB) * 1024


def kill_user(uid: int) -> None:
    """Every process of a step user (what a step killed by timeout or cancel could not end
    itself)."""
    import psutil

    for proc in psutil.process_iter(["uids"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.info["uids"] and proc.info["uids"].real == uid:
                os.kill(proc.pid, signal.SIGKILL)
