"""Committing: the scheduler's decisions written to the store in one batch, the observers told
by named hooks, and only then the effects handed out.

An observer is a part that reacts to what the master commits (the outbox, the log budget, a
run's own secrets, the event log, the metrics). Its hooks do nothing unless it overrides them,
so each says only what it cares about; the committer calls them in this order for each batch:
`writing` (a last look at the batch, which it may change), `runs_ended` (the runs the batch
ends: records added then are written with them), the write, `committed`, `handing_out`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cicd_ray.records import Changes, RunRecord
from cicd_ray.scheduler import Effects, Scheduler
from cicd_ray.store import Store


class Observer:
    """The hooks of a part told of each committed batch; each does nothing by default."""

    def writing(self, changes: Changes, now: float) -> None:
        """Before the write: the batch as it will be written (it may be changed here)."""

    def runs_ended(self, runs: list[RunRecord], changes: Changes, now: float) -> None:
        """Before the write: the runs this batch ends (records added are written with them)."""

    def committed(self, changes: Changes, took_s: float, now: float) -> None:
        """After the write, with what it changed and how long the store took."""

    def handing_out(self, effects: Effects) -> None:
        """After the write: the effects about to be carried out (dispatch, kill, ...)."""


class Committer:
    """Writes the scheduler's decisions before anything is acted on (invariant 2)."""

    def __init__(
        self,
        store: Store,
        sched: Scheduler,
        clock: Callable[[], float],
        observers: list[Observer],
    ) -> None:
        self.store = store
        self.sched = sched
        self.clock = clock
        self.observers = observers
        self._effects = Effects()

    def commit(self, extra: Changes | None = None) -> None:
        """Write the scheduler's decisions, with `extra` (records that are not the scheduler's:
        an Idempotency-Key, a run's own secrets, audit, schedules), and keep the effects for
        `take_effects`. StoreError: nothing was written, nothing is carried out; memory is
        then ahead of the store and the core must be rebuilt from it."""
        decisions = self.sched.take()
        changes = decisions.changes
        if extra is not None:
            merge(changes, extra)
        now = self.clock()
        for observer in self.observers:
            observer.writing(changes, now)
        if decisions.ended_runs:
            for observer in self.observers:
                observer.runs_ended(decisions.ended_runs, changes, now)
        if changes:
            t0 = time.perf_counter()
            self.store.save(changes)
            took_s, now = time.perf_counter() - t0, self.clock()
            for observer in self.observers:
                observer.committed(changes, took_s, now)
        effects = decisions.effects()
        for observer in self.observers:
            observer.handing_out(effects)
        self._effects.extend(effects)

    def take_effects(self) -> Effects:
        """The effects committed since the last call, for the shell to carry out."""
        out, self._effects = self._effects, Effects()
        return out


def merge(changes: Changes, extra: Changes) -> None:
    """Add to the scheduler's batch the records of another part's."""
    changes.idempotency.update(extra.idempotency)
    changes.run_secrets.update(extra.run_secrets)
    changes.audit += extra.audit
    changes.deliveries.update(extra.deliveries)
    changes.schedules.update(extra.schedules)
    changes.drop_schedules += extra.drop_schedules
