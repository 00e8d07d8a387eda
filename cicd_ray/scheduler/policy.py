"""`Scheduler`: the policy's one entry point. Each method changes the view and collects what
must happen in a `Decisions` batch; the master takes it with `take()`, writes its records, and
only then dispatches, kills, starts or stops anything.

It wires its parts, each an object that says in its constructor what it works on: the runs'
DAG state (`RunBook`), flow control (`Flow`), the ready queues, the slots, advancing runs
from ended steps (`Advance`), the attempts (`Attempts`), run control (`Control`) and recovery
(`Recovery`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from cicd_ray.pipeline.model import PlannedStep
from cicd_ray.pools import PoolConfig
from cicd_ray.protocol import StepOutcome
from cicd_ray.records import AttemptRecord, ResultRecord, RunRecord, StepRecord, WorkerRecord
from cicd_ray.scheduler.advance import Advance
from cicd_ray.scheduler.attempts import Attempts
from cicd_ray.scheduler.builds import carry
from cicd_ray.scheduler.control import Control
from cicd_ray.scheduler.decisions import Decisions
from cicd_ray.scheduler.flow import Flow
from cicd_ray.scheduler.lookahead import upcoming, workers_wanted
from cicd_ray.scheduler.queues import ReadyQueues
from cicd_ray.scheduler.recovery import Recovery
from cicd_ray.scheduler.runbook import RunBook
from cicd_ray.scheduler.share import Share
from cicd_ray.scheduler.slots import Slots
from cicd_ray.states import WorkerState


class Scheduler:
    """The pure scheduling policy of one master: runs, steps, attempts and workers as the
    master knows them, and the decisions that follow from each change and each tick. No Ray,
    no clock: every method that decides takes `now`."""

    def __init__(
        self,
        pools: dict[str, PoolConfig],
        heartbeat_timeout_s: float = 15.0,
        lookahead: bool = True,
        artifact_run_max_bytes: int = 20 * 1024**3,
        results: Callable[[str], ResultRecord | None] = lambda key: None,
        share: Share | None = None,
    ) -> None:
        self.pools = pools
        self.lookahead_on = lookahead  # CICD_RAY_LOOKAHEAD
        self._out = out = Decisions()
        self.book = RunBook(out, ended=lambda record: self.flow.ended(record))
        self.flow = Flow(self.book, out, lambda *member: self.control.replace(*member))
        self.queues = ReadyQueues(pools, self.book.step, share)
        self.slots = Slots(pools, heartbeat_timeout_s, out)
        self.advance = Advance(self.book, self.flow, self.queues, out, results)
        self._attempts = Attempts(
            pools, self.book, self.slots, self.queues, self.advance, out, artifact_run_max_bytes
        )
        self.control = Control(self.book, self.flow, self.advance, self._attempts, out)
        self.recovery = Recovery(self.book, self.slots, self.flow, self.advance, self._attempts)
        self._seq = 0

    @property
    def runs(self) -> dict[str, RunRecord]:
        return self.book.runs

    @property
    def steps(self) -> dict[str, dict[str, StepRecord]]:
        return self.book.steps

    @property
    def workers(self) -> dict[str, WorkerRecord]:
        return self.slots.workers

    @property
    def attempts(self) -> dict[str, AttemptRecord]:
        """The running attempts, by id."""
        return self._attempts.running

    def take(self) -> Decisions:
        return self._out.drain()

    # --- runs -------------------------------------------------------------------------------

    def submit(
        self,
        run: RunRecord,
        planned: list[PlannedStep],
        now: float,
        carried: dict[str, StepRecord] | None = None,
    ) -> None:
        """Accept a new run (the caller has checked `check_fits`). `carried`: successes of an
        earlier run (by step name) taken over as they are, with their artifacts (a re-run of
        the failed part)."""
        self._seq = max(self._seq, run.seq) + 1
        run.seq = self._seq
        steps = [
            carry(carried[p.name], run.id, now)
            if carried and p.name in carried
            else StepRecord(run_id=run.id, spec=p, queued_at=now, project=run.project)
            for p in planned
        ]
        self.book.adopt(run, steps)
        self._out.record(run)
        for s in steps:
            self._out.record(s)
        if self.flow.admit_run(run, fresh=True, now=now):
            self.advance.start_run(run, now)
        self.book.finish_run_if_done(run.id, now)  # every step carried over

    def cancel(
        self, run_id: str, now: float, reason: str = "cancelled by request", spare: bool = False
    ) -> RunRecord | None:
        """See `Control.cancel`."""
        return self.control.cancel(run_id, now, reason, spare)

    def approve(
        self, run_id: str, name: str, approved: bool, by: str, comment: str, now: float
    ) -> str | None:
        """See `Control.approve`."""
        return self.control.approve(run_id, name, approved, by, comment, now)

    def restore(
        self,
        runs: list[RunRecord],
        steps: list[StepRecord],
        workers: list[WorkerRecord],
        now: float,
        attempts: list[AttemptRecord] = (),
    ) -> None:
        """Rebuild the view from the store after a master restart (`Recovery.restore`)."""
        self._seq = max(self._seq, self.recovery.restore(runs, steps, workers, now, attempts))

    # --- workers and attempts ---------------------------------------------------------------

    def register_worker(self, worker: WorkerRecord, now: float) -> None:
        self.slots.register(worker, now)

    def reconcile(
        self, worker_id: str, running: list[str], finished: list[StepOutcome], now: float
    ) -> None:
        """See `Recovery.reconcile`."""
        self.recovery.reconcile(worker_id, running, finished, now)

    def heartbeat(self, worker_id: str, usage: dict[str, float], now: float) -> bool:
        """Note a heartbeat; False when the worker is not (or no longer) known as ready."""
        return self.slots.heartbeat(worker_id, usage, now)

    def worker_lost(self, worker_id: str, reason: str, now: float) -> None:
        """The worker died or went silent: its steps are retried as infra failures or fail."""
        if worker_id not in self.workers:  # unknown, or already let go
            return
        gone = self.slots.let_go(worker_id, WorkerState.LOST, f"lost: {reason}", now)
        self._attempts.lost(gone, f"worker {worker_id} lost: {reason}", now)

    def on_outcome(self, outcome: StepOutcome, now: float) -> bool:
        """Apply a worker's report once. A stale or duplicate report is ignored (False)."""
        return self._attempts.on_outcome(outcome, now)

    # --- the periodic decision ----------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Take up what concurrency groups let in and the approvals that ran out, notice silent
        workers, keep pools at size, and place ready steps on free slots."""
        self.control.tick(now)
        for worker_id, silent_s in self.slots.silent(now):
            self.worker_lost(worker_id, f"no heartbeat for {silent_s:.0f} s", now)
        self.slots.size(self._queued_cpu(), now)
        self.queues.share.running = Counter(
            self.runs[a.run_id].project for a in self.attempts.values()
        )
        for pool in self.queues.nonempty():
            workers = self.slots.ready_in(pool)
            if not workers:
                continue
            for step, worker in self.queues.placements(
                pool,
                lambda s, ws=workers: self.slots.least_loaded(ws, s.spec),
                lambda ws=workers: self.slots.any_room(ws),
            ):
                self._attempts.start(step, worker, now)

    def _queued_cpu(self) -> dict[str, list[float]]:
        """Per pool, the CPUs of each step ready and waiting in it."""
        return {pool: [s.spec.cpu for s in self.queues.waiting(pool)] for pool in self.pools}

    # --- look-ahead and views -----------------------------------------------------------------

    def lookahead(self) -> dict[str, int]:
        """Per pool, the workers its coming steps will need, where more than it has (see
        `cicd_ray.scheduler.lookahead`); nothing when look-ahead is off."""
        if not self.lookahead_on:
            return {}
        coming = upcoming(self.book, self.attempts.values())
        return workers_wanted(self.pools, coming, self.slots.views(), self._queued_cpu())

    def worker_load(self, worker_id: str) -> tuple[float, list[str]]:
        """CPUs in use and the attempts running on a worker (kept in memory, not stored)."""
        return self.slots.load_of(worker_id)

    def queue_view(self, now: float) -> dict[str, dict]:
        return self.queues.view(now)
