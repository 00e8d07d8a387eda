"""The worker actors as the master reaches them: started, found again by name, given steps,
told to cancel, killed; and the standing request for capacity the look-ahead makes.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray.exceptions import RayActorError, RayError

from cicd_ray.config import Settings
from cicd_ray.master.core import MasterCore
from cicd_ray.names import NAMESPACE, worker_actor_name
from cicd_ray.protocol import StepOutcome, StepTask
from cicd_ray.scheduler import Effects
from cicd_ray.states import StepState
from cicd_ray.worker.actor import start_worker

log = logging.getLogger(__name__)


class WorkerActors:
    """The worker actors, as the master reaches them: started, found again by name, given
    steps, told to cancel, killed. What they answer (or their death) goes to the core through
    `guarded`, which also carries out what the core then commits."""

    def __init__(self, settings: Settings, core: MasterCore, guarded, wake: asyncio.Event) -> None:
        self.settings = settings.for_workers()
        self.core = core
        self._guarded = guarded
        self._wake = wake
        self._handles: dict[str, ray.actor.ActorHandle] = {}

    def carry_out(self, effects: Effects) -> None:
        for record in effects.start_workers:
            self._handles[record.id] = start_worker(record, self.settings)
            asyncio.get_running_loop().create_task(self._watch_start(record.id))
        for worker_id in effects.stop_workers:
            self.kill(worker_id)
        for worker_id, task in effects.dispatch:
            self._dispatch(worker_id, task)
        for kill in effects.kill:
            handle = self._handles.get(kill.worker_id)
            if handle is not None:
                handle.cancel.remote(kill.attempt_id)

    def _dispatch(self, worker_id: str, task: StepTask) -> None:
        handle = self._handles.get(worker_id)
        if handle is None:
            self._lost_later(worker_id, "no handle to the worker actor")
            return
        task.master_epoch = self.core.started_at
        ref = handle.run_step.remote(task)
        asyncio.get_running_loop().create_task(self._await_outcome(worker_id, task, ref))

    def _lost_later(self, worker_id: str, reason: str) -> None:
        """A worker found lost while effects are carried out: the core hears of it next."""
        asyncio.get_running_loop().call_soon(
            self._guarded, self.core.worker_lost, worker_id, reason
        )

    async def _await_outcome(self, worker_id: str, task: StepTask, ref) -> None:
        try:
            outcome = await ref
        except RayActorError as e:
            self._guarded(self.core.worker_lost, worker_id, f"actor died ({type(e).__name__})")
        except RayError as e:
            self._guarded(
                self.core.report,
                StepOutcome(
                    attempt_id=task.attempt_id,
                    run_id=task.run_id,
                    step=task.step.name,
                    state=StepState.FAILED,
                    reason=f"worker error: {e}",
                ),
            )
        else:
            self._guarded(self.core.report, outcome)
        self._wake.set()

    async def _watch_start(self, worker_id: str) -> None:
        handle = self._handles.get(worker_id)
        try:
            await handle.ready.remote()
        except RayError as e:
            self._guarded(self.core.worker_lost, worker_id, f"failed to start ({type(e).__name__})")
            self._wake.set()

    def adopt(self, worker_id: str, watch: bool = False) -> None:
        """Find a worker actor by its name (after a master restart, or when it registers);
        `watch` one still starting: it is lost if it fails to start."""
        if worker_id in self._handles:
            return
        try:
            self._handles[worker_id] = ray.get_actor(
                worker_actor_name(worker_id), namespace=NAMESPACE
            )
        except ValueError:
            self._lost_later(worker_id, "its actor no longer exists")
            return
        if watch:
            asyncio.get_running_loop().create_task(self._watch_start(worker_id))

    def kill(self, worker_id: str) -> None:
        handle = self._handles.pop(worker_id, None)
        if handle is None:
            try:
                handle = ray.get_actor(worker_actor_name(worker_id), namespace=NAMESPACE)
            except ValueError:
                return
        ray.kill(handle, no_restart=True)

    def kill_all(self) -> int:
        ids = list(self._handles)
        for worker_id in ids:
            self.kill(worker_id)
        return len(ids)


def request_capacity(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=bundles)
    except Exception as e:  # look-ahead is a hint: never a reason to fail
        log.warning("could not ask the autoscaler for capacity: %s", e)
