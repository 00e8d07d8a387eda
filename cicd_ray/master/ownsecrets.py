"""A run's own secrets (given with its submission): handed to the steps that list them as they
are dispatched, and deleted from the store once no step can be given them any more, when every
step that lists one has ended (a retry would still need them), not only when the run ends.
"""

from __future__ import annotations

from cicd_ray.master.commit import Observer
from cicd_ray.records import Changes
from cicd_ray.scheduler import Effects, Scheduler
from cicd_ray.store import Store


class OwnSecrets(Observer):
    """Keeps, per run that has own secrets, their names (never their values)."""

    def __init__(self, store: Store, sched: Scheduler) -> None:
        self.store = store
        self.sched = sched
        self.names: dict[str, set[str]] = {}

    def recover(self, run_ids: list[str]) -> None:
        """After a restart: the active runs' own secrets, as the store still holds them."""
        for run_id in run_ids:
            own = self.store.get_run_secrets(run_id)
            if own:
                self.names[run_id] = set(own)

    def writing(self, changes: Changes, now: float) -> None:
        ended = [run_id for run_id, run in changes.runs.items() if run.state.terminal]
        changes.drop_run_secrets += ended
        changes.drop_run_secrets += self._no_longer_needed(
            changes.drop_run_secrets, {run_id for run_id, _ in changes.steps}
        )
        for run_id, values in changes.run_secrets.items():
            self.names[run_id] = set(values.values)  # looked at from the next commit

    def handing_out(self, effects: Effects) -> None:
        """The run's own secrets a dispatched step lists, read from the store as handed out."""
        for _, task in effects.dispatch:
            if task.step.secrets:
                own = self.store.get_run_secrets(task.run_id)
                task.secret_values = {n: own[n] for n in task.step.secrets if n in own}

    def _no_longer_needed(self, dropped: list[str], touched: set[str]) -> list[str]:
        """Runs whose own secrets no step will be given any more. Only the runs whose steps
        this batch changed are looked at: a commit stays cheap."""
        out = []
        for run_id in touched.union(dropped) & self.names.keys():
            names, steps = self.names[run_id], self.sched.steps.get(run_id)
            if run_id in dropped or steps is None:
                del self.names[run_id]
            elif all(s.state.terminal for s in steps.values() if names & set(s.spec.secrets)):
                del self.names[run_id]
                out.append(run_id)
        return out
