"""The command of flow control: `approve`."""

from __future__ import annotations

import getpass

import typer
from rich.markup import escape

from cicd_ray.cli.connect import control
from cicd_ray.cli.root import ADDRESS, URL, app, out, reported
from cicd_ray.cli.show import styled


@app.command()
def approve(
    run_id: str,
    step: str,
    reject: bool = typer.Option(False, "--reject", help="reject it: the step fails"),
    comment: str = typer.Option("", "--comment", help="why, recorded with the answer"),
    by: str | None = typer.Option(None, "--by", help="who answers (default: your user name)"),
    url: str | None = URL,
    address: str | None = ADDRESS,
):
    """Release (or --reject) a step waiting for approval."""
    with reported(), control(url, address, "approve") as (runner, _):
        state = runner.approve(run_id, step, not reject, by or _user(), comment)
    out.print(escape(f"{step} in run {run_id}: ") + styled(state))


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no name for this uid
        return "anonymous"
