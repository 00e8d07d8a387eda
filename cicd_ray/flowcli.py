"""The `cicd-ray` command of flow control, `approve` (added to cli's app), and what `status`
says of a run's flow: answers to approvals, steps waiting for one, notifications."""

from __future__ import annotations

import getpass
import time

import typer
from rich.markup import escape

from cicd_ray.cli import ADDRESS, URL, _control, _reported, _styled, app, out
from cicd_ray.protocol import RunView
from cicd_ray.states import StepState


@app.command()
def approve(run_id: str, step: str,
            reject: bool = typer.Option(False, "--reject", help="reject it: the step fails"),
            comment: str = typer.Option("", "--comment", help="why, recorded with the answer"),
            by: str | None = typer.Option(None, "--by", help="who answers (default: your "
                                          "user name)"),
            url: str | None = URL, address: str | None = ADDRESS):
    """Release (or --reject) a step waiting for approval."""
    with _reported(), _control(url, address, "approve") as (runner, _):
        state = runner.approve(run_id, step, not reject, by or _user(), comment)
    out.print(escape(f"{step} in run {run_id}: ") + _styled(state))


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no name for this uid
        return "anonymous"


def _at(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def flow_notes(view: RunView) -> list[str]:
    """A line per approval asked or answered, and per notification of the run's end."""
    lines = []
    for s in view.steps:
        if s.state is StepState.WAITING_APPROVAL:
            lines.append(f"{s.name}: waiting for approval since {_at(s.waiting_since)}: "
                         f"{s.spec.approval.prompt} (cicd-ray approve {view.run.id} {s.name} "
                         "[--reject])")
        elif s.approval is not None:
            a = s.approval
            lines.append(f"{s.name}: {a.decision} by {a.by} at {_at(a.at)}"
                         + (f": {a.comment}" if a.comment else ""))
    for d in view.deliveries:
        what = f"commit status {d.status}" if d.kind == "status" else "notification"
        said = f"{what} to {d.url}: {d.state} after {d.attempts} tr" \
               f"{'y' if d.attempts == 1 else 'ies'}"
        if d.status_code is not None:
            said += f" (HTTP {d.status_code})"
        if d.error and d.state != "delivered":
            said += f"; {d.error}"
        lines.append(said)
    return lines
