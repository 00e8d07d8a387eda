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


def pids_in(path, count: int = 1, timeout_s: float = 30) -> list[int]:
    """The pids a step wrote to `path`, once it holds `count` whole lines (a file that exists
    may still be empty, or half written)."""
    def read() -> list[int]:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return []
        lines = text.split("\n")
        whole = [line for line in lines[:-1] if line.strip()]  # the last has no newline yet
        return [int(p) for p in whole] if len(whole) >= count else []

    return wait_until(read, timeout_s, f"{count} pid(s) in {path}")
