"""The outbox of notifications: a delivery is recorded in the batch that ends its run, marked
`sending` in the store before each try, and settled after it. A master that restarts finds the
open deliveries in the store: pending ones are tried when due; one it finds `sending` was
interrupted mid-try and is not tried again (at most once per run end, invariant 9).

The HTTP request itself (`cicd_ray.notify.webhooks.send`) is made by the master's shell, off
its loop.
"""

from __future__ import annotations

from cicd_ray.config import Settings
from cicd_ray.master.commit import Observer
from cicd_ray.notify import statuses
from cicd_ray.notify.webhooks import document, log_tail, next_try
from cicd_ray.pipeline.model import NotifySpec
from cicd_ray.records import Changes, DeliveryRecord, RunRecord
from cicd_ray.secrets import read
from cicd_ray.states import StepState
from cicd_ray.store import Store

RETRY_STATUS = frozenset({408, 429})  # and every 5xx: the receiver may take it later


def targets(run: RunRecord, settings: Settings) -> list[NotifySpec]:
    """Where a run's end is told: its pipeline's `notify:`, else the server's default webhook
    (CICD_RAY_NOTIFY_WEBHOOK, failed runs), in either case only for the states listed."""
    notify = run.notify or (
        [NotifySpec(webhook=settings.notify_webhook)] if settings.notify_webhook else []
    )
    return [n for n in notify if run.state.value in n.when]


class Outbox(Observer):
    """The open deliveries (notifications, commit statuses): recorded with the batch that causes
    them, tried with backoff, each try marked in the store before it is made."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.open: dict[str, DeliveryRecord] = {}

    def recover(self, now: float) -> None:
        """Take up the open deliveries; those a restart interrupted mid-try are settled."""
        changes = Changes()
        for d in self.store.get_deliveries():
            if d.state == "sending":
                d.state, d.finished_at = "interrupted", now
                d.error = (
                    f"the master restarted during try {d.attempts}; not tried again "
                    "(at most once per run end)"
                )
                changes.deliveries[d.id] = d
            else:
                self.open[d.id] = d
        if changes:
            self.store.save(changes)

    def runs_ended(self, runs: list[RunRecord], changes: Changes, now: float) -> None:
        """Add the deliveries of runs that ended to the batch that ends them: notifications,
        and the commit status of a run a repository's webhook started."""
        for run in runs:
            for i, target in enumerate(targets(run, self.settings)):
                d = DeliveryRecord(
                    id=f"{run.id}/{i}",
                    run_id=run.id,
                    url=target.webhook,
                    created_at=now,
                    next_at=now,
                )
                changes.deliveries[d.id] = d
                self.open[d.id] = d
            self.record_status(run, changes, now, ended=True)

    def record_status(
        self, run: RunRecord, changes: Changes, now: float, ended: bool = False
    ) -> None:
        """The commit status of a run its repository reports to (pending when it is accepted,
        its outcome when it ends); a pending one not yet sent when the run ends is dropped."""
        repo = self.settings.repos.get(run.repo)
        if repo is None or repo.status_url is None or not run.commit:
            return
        if ended and (start := self.open.pop(f"{run.id}/status-start", None)) is not None:
            start.state, start.finished_at = "failed", now
            start.error = "not sent before the run ended; its end is reported instead"
            changes.deliveries[start.id] = start
        d = DeliveryRecord(
            id=f"{run.id}/status-{'end' if ended else 'start'}",
            run_id=run.id,
            kind="status",
            url=statuses.target(repo, run.commit),
            created_at=now,
            next_at=now,
            status=statuses.word(repo.provider, run.state.value if ended else None),
        )
        changes.deliveries[d.id] = d
        self.open[d.id] = d

    def take_due(self, now: float) -> list[DeliveryRecord]:
        """The deliveries due now, marked `sending` in the store before they are tried."""
        due = [d for d in self.open.values() if d.state == "pending" and d.next_at <= now]
        if not due:
            return []
        changes = Changes()
        for d in due:
            d.state = "sending"
            d.attempts += 1
            changes.deliveries[d.id] = d
        self.store.save(changes)
        return [d.model_copy() for d in due]

    def settle(
        self, delivery_id: str, status: int | None, error: str, now: float, final: bool = False
    ) -> None:
        """A try ended with an HTTP status (None: no answer, `error` says why): delivered,
        tried again later (with backoff, within the delivery window) or failed (at once when
        `final`: a target refused)."""
        d = self.open.get(delivery_id)
        if d is None:
            return
        d.status_code, d.error = status, (error or (f"HTTP {status}" if status else ""))[:500]
        retry = not final if status is None else (status >= 500 or status in RETRY_STATUS)
        if status is not None and 200 <= status < 300:
            d.state, d.error = "delivered", ""
        elif retry and (at := next_try(d.attempts, d.created_at, now)) is not None:
            d.state, d.next_at = "pending", at
        else:
            d.state = "failed"
        if d.state != "pending":
            d.finished_at = now
            del self.open[d.id]
        self.store.save(Changes(deliveries={d.id: d}))

    def body(self, delivery: DeliveryRecord) -> bytes:
        """The document for a delivery, from what the store holds of its run."""
        run = self.store.get_run(delivery.run_id)
        if delivery.kind == "status":
            repo = self.settings.repos[run.repo]
            return statuses.document(
                repo.provider, delivery.status, run.id, run.pipeline, self._page(run.id)
            )
        failed = []
        for step in self.store.get_steps(delivery.run_id):
            if step.state not in (StepState.FAILED, StepState.TIMED_OUT):
                continue
            log = self.store.read_log(step.current_attempt) if step.current_attempt else b""
            failed.append(
                {
                    "step": step.name,
                    "state": step.state.value,
                    "reason": step.reason,
                    "exit_code": step.exit_code,
                    "log_tail": log_tail(log),
                }
            )
        return document(run.model_dump(mode="json"), failed, self._page(run.id), delivery.id)

    def headers(self, delivery: DeliveryRecord) -> dict[str, str]:
        """A commit status's credentials: the repository's `status_token`, a secret of its
        project, read now (never stored with the delivery). SecretError when it is missing."""
        if delivery.kind != "status":
            return {}
        repo = self.settings.repos[self.store.get_run(delivery.run_id).repo]
        token = read(self.settings.secrets_dir, repo.project, repo.status_token or "")
        return statuses.headers(repo.provider, token)

    def _page(self, run_id: str) -> str:
        base = (self.settings.url or "").rstrip("/")
        return f"{base}/#/runs/{run_id}" if base else ""
