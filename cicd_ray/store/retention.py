"""What is stored is not forever: finished runs with their logs (and the artifacts no other
run or reusable result points at), source archives no run needs, Idempotency-Keys and the
records of stopped workers are deleted once they are old.

`collect` works on any `Store` with the time passed in; the master calls it periodically
(CICD_RAY_RETENTION_DAYS, default 30; 0 keeps everything) and `cicd-ray gc` calls it on
demand, `--dry-run` counting what would go.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from cicd_ray.errors import CicdError
from cicd_ray.store.base import KEY_TTL_S, Store
from cicd_ray.store.blobs import ArtifactStore

SOURCE_GRACE_S = 3600  # a source this young may belong to a submission being stored
RUN_BATCH = 500  # runs deleted per store transaction
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class Collected:
    runs: int = 0  # with their steps, attempts and logs
    sources: int = 0
    keys: int = 0
    workers: int = 0
    artifacts: int = 0  # files in the artifact store that nothing kept points at

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def parse_duration(text: str) -> float:
    """`7d`, `12h`, `30m`, `90s` or plain seconds, in seconds."""
    match = DURATION.match(text)
    if not match:
        raise CicdError(
            f"{text!r} is not a duration: use a number with s, m, h, d or w (e.g. 7d or 12h)"
        )
    return float(match.group(1)) * UNIT_S[match.group(2)]


def collect(
    store: Store,
    now: float,
    older_than_s: float,
    dry_run: bool = False,
    max_runs: int | None = None,
    artifacts: ArtifactStore | None = None,
) -> Collected:
    """Delete (or with `dry_run`, count) what is older than `older_than_s`: finished runs and
    their logs, stopped workers' records; Idempotency-Keys older than a day; source archives
    that no queued or running run needs. `max_runs` bounds one call's work."""
    out = Collected()
    before = now - older_than_s
    if dry_run:
        out.runs = len(store.expired_runs(before, limit=max_runs or 10**9))
    while not dry_run and (max_runs is None or out.runs < max_runs):
        limit = RUN_BATCH if max_runs is None else min(RUN_BATCH, max_runs - out.runs)
        batch = store.expired_runs(before, limit=limit)
        if not batch:
            break
        store.delete_runs([r.id for r in batch])
        out.runs += len(batch)
    needed = {r.source_digest for r in store.active_runs() if r.source_digest}
    stale = [d for d, at in store.list_sources() if d not in needed and at < now - SOURCE_GRACE_S]
    out.sources = len(stale)
    keys = store.old_keys(now - KEY_TTL_S)
    out.keys = len(keys)
    workers = [
        w.id for w in store.list_workers() if w.stopped_at is not None and w.stopped_at < before
    ]
    out.workers = len(workers)
    if not dry_run:
        store.delete_sources(stale)
        store.delete_keys(keys)
        store.delete_workers(workers)
    if artifacts is not None:
        out.artifacts = _unreferenced(store, artifacts, now, dry_run)
    return out


def _unreferenced(store: Store, artifacts: ArtifactStore, now: float, dry_run: bool) -> int:
    """Files no stored step or result points at, older than the grace period (a step that
    just kept one has not reported it yet): deleted, or counted on a dry run (which deletes
    no run, so it counts those that are unreferenced already)."""
    referenced = store.artifact_digests()
    unused = {
        d
        for d, at in artifacts.digests().items()
        if d not in referenced and at < now - SOURCE_GRACE_S
    }
    leftovers = artifacts.leftovers(now - SOURCE_GRACE_S)
    if not dry_run:
        artifacts.delete(unused)
        for path in leftovers:
            path.unlink(missing_ok=True)
    return len(unused) + len(leftovers)
