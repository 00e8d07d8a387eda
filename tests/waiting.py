"""Waiting on a condition, never on the clock: what the tests use instead of fixed sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import psutil


def wait_until(check: Callable[[], object], timeout_s: float = 30, what: str = "") -> object:
    """Poll `check` until it returns something truthy, and return that; fail after
    `timeout_s` naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s} s for {what or check}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def all_gone(pids: Iterable[int], timeout_s: float = 10) -> bool:
    """True once none of `pids` runs (a zombie is gone); False if one still runs after
    `timeout_s`."""
    pids = list(pids)
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


STEP_UIDS_FROM = 200_000  # the tests' step users (CICD_RAY_STEP_UIDS) start here


def host_pids(pids: Iterable[int]) -> list[int]:
    """The pids a step printed, as this process sees them: a step in a PID namespace of its
    own (a root worker's, where namespaces are allowed) prints pids of that namespace, so
    each is matched with the step users' processes whose innermost pid it is (all of them,
    if several namespaces hold one: every one of them is then waited on; none, if it has
    ended)."""
    wanted, found = set(pids), []
    nested: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["uids"]):
        if not proc.info["uids"] or proc.info["uids"].real < STEP_UIDS_FROM:
            continue
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                chain = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
        except OSError:
            continue
        if len(chain) > 1 and int(chain[-1]) in wanted:
            nested.setdefault(int(chain[-1]), []).append(proc.pid)
    from cicd_ray.worker.isolation import pid_namespaces

    for pid in wanted:  # in namespaces, a pid no process has any more is one that ended
        found += nested.get(pid, [] if pid_namespaces() else [pid])
    return found


def pids_in(path, count: int = 1, timeout_s: float = 30) -> list[int]:
    """The pids a step wrote to `path` (as this process sees them: `host_pids`), once it holds
    `count` whole lines (a file that exists may still be empty, or half written)."""

    def read() -> list[int]:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return []
        lines = text.split("\n")
        whole = [line for line in lines[:-1] if line.strip()]  # the last has no newline yet
        return [int(p) for p in whole] if len(whole) >= count else []

    return host_pids(wait_until(read, timeout_s, f"{count} pid(s) in {path}"))
