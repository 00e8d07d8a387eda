"""An inline driver: the master's core with its steps run in this process, one at a time,
until nothing is left to do (as dramatiq's StubBroker.join() and arq's burst mode do for
theirs). No Ray: workers the core starts register at once, dispatched attempts run through the
real executor, their logs and outcomes go back to the core. Tests drive commit order, recovery
and duplicate reports with it deterministically.
"""

from __future__ import annotations

import io
from pathlib import Path

from cicd_ray.master.core import MasterCore
from cicd_ray.protocol import SourceRef, StepOutcome, StepTask
from cicd_ray.records import WorkerRecord
from cicd_ray.source import snapshot, unpack
from cicd_ray.states import StepState, WorkerState
from cicd_ray.worker.config import ExecConfig
from cicd_ray.worker.execution import Execution


class InlineDriver:
    """Runs the master's core with its steps executed in this process, one at a time, until
    nothing is left to do: the deterministic driver unit tests use."""

    def __init__(self, core: MasterCore, work_dir: Path, step_uids: range | None = None) -> None:
        self.core = core
        self.config = ExecConfig.of(core.settings, work_dir, step_uids)
        self.workers: dict[str, WorkerRecord] = {}  # as each worker knows itself
        self.pending: list[tuple[str, StepTask]] = []  # dispatched, not yet run
        self.outcomes: list[StepOutcome] = []  # every outcome reported, in order

    def carry_out(self) -> bool:
        """Do what the core committed; whether there was anything."""
        effects = self.core.take_effects()
        for record in effects.start_workers:
            self.start(record)
        for worker_id in effects.stop_workers:
            self.workers.pop(worker_id, None)
        self.pending += effects.dispatch
        for kill in effects.kill:
            for worker_id, task in [p for p in self.pending if p[1].attempt_id == kill.attempt_id]:
                self.pending.remove((worker_id, task))
                self.report(
                    StepOutcome(
                        attempt_id=task.attempt_id,
                        run_id=task.run_id,
                        step=task.step.name,
                        state=StepState.CANCELLED,
                        reason="cancelled",
                    )
                )
        return bool(effects)

    def start(
        self,
        record: WorkerRecord,
        running: list[str] | None = None,
        finished: list[StepOutcome] | None = None,
    ) -> None:
        """A worker comes up and registers (again, after a master restart: with what it runs
        and what it finished)."""
        mine = record.model_copy(update={"state": WorkerState.STARTING, "node": "inline"})
        self.workers[record.id] = mine
        self.core.register(mine.model_copy(), running, finished)

    def until_dispatched(self, rounds: int = 10) -> list[tuple[str, StepTask]]:
        """Tick until something is dispatched (workers start and register first)."""
        for _ in range(rounds):
            self.carry_out()
            if self.pending:
                return self.pending
            self.core.tick()
        raise RuntimeError(f"nothing dispatched after {rounds} ticks")

    def run_next(self) -> StepOutcome:
        """Run the next dispatched attempt and report its outcome."""
        _, task = self.pending.pop(0)
        outcome = self.execute(task)
        self.report(outcome)
        return outcome

    def execute(self, task: StepTask) -> StepOutcome:
        """Run an attempt, its log going to the store, without reporting its outcome."""
        source = self._source(task.source_digest) if task.source_digest else None
        ship = lambda seq, data: self.core.append_log(task.attempt_id, seq, data)  # noqa: E731
        return Execution(task, self.config, source, ship).run()

    def report(self, outcome: StepOutcome) -> bool:
        self.outcomes.append(outcome)
        return self.core.report(outcome)

    def run_until_idle(self, max_rounds: int = 10_000) -> None:
        """Carry out, run and tick until a tick brings nothing new."""
        for _ in range(max_rounds):
            self.carry_out()
            if self.pending:
                self.run_next()
                continue
            self.core.tick()
            if not self.carry_out() and not self.pending:
                return
        raise RuntimeError(f"still busy after {max_rounds} rounds")

    def source(self, folder: Path) -> SourceRef:
        """A folder packed and put in the artifact store, as an edge does before it submits."""
        digest, data = snapshot(folder, self.core.settings.source_limit_bytes)
        self.config.artifacts.put(io.BytesIO(data))
        return SourceRef(digest=digest, size=len(data))

    def _source(self, digest: str) -> Path:
        dest = self.config.work_dir / "sources" / digest
        if not dest.is_dir():
            store = self.config.artifacts
            data = store.read(digest) if store is not None else None
            if data is None:  # a run submitted before snapshots went to the artifact store
                data = self.core.store.get_source(digest)
            if data is None:
                raise FileNotFoundError(f"source snapshot {digest[:12]} is not in the store")
            unpack(data, dest, digest)
        return dest
