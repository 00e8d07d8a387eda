"""Durable stores. `open_store` picks the backend from a URL or a path."""

from __future__ import annotations

from pathlib import Path

from cicd_ray.errors import StoreError
from cicd_ray.store.base import Store
from cicd_ray.store.sqlite import SqliteStore

__all__ = ["SqliteStore", "Store", "open_reader", "open_store"]


def open_store(url: str | Path) -> Store:
    """`sqlite:///abs/path.sqlite3` (or a plain file path) opens the embedded SQLite store;
    `redis://[:password@]host:port/db` (or `rediss://`) the Redis store."""
    text = str(url)
    if text.startswith("sqlite:///"):
        return SqliteStore(text[len("sqlite://") :])
    if text.startswith(("redis://", "rediss://")):
        from cicd_ray.store.redis import RedisStore

        return RedisStore(text)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise StoreError(
            f"store URL {text.split('@')[-1]!r}: unknown scheme {scheme!r}; use "
            "sqlite:///PATH or redis://HOST:PORT/DB"
        )
    return SqliteStore(Path(text))


def open_reader(url: str | Path) -> Store | None:
    """The store for a process that only reads it (the API): None for a SQLite file that does
    not exist here, which opening would create empty (the master runs on another machine)."""
    text = str(url)
    if "://" not in text or text.startswith("sqlite:///"):
        path = Path(text[len("sqlite://") :] if text.startswith("sqlite:///") else text)
        if not path.exists():
            return None
    return open_store(url)
