"""The commands of projects: `token create`, which makes a token of a project and a role,
`schedules` and `audit`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from cicd_ray import tokens
from cicd_ray.cli.root import AS_JSON, URL, app, fail, out, reported
from cicd_ray.config import Settings
from cicd_ray.errors import CicdError

token_app = typer.Typer(no_args_is_help=True, help="API tokens: each of a project and a role.")


app.add_typer(token_app, name="token")


@token_app.command("create")
def create(
    role: tokens.Role = typer.Option(
        ...,
        "--role",
        help="read: see runs, logs and "
        "artifacts; submit: also start, cancel, re-run and "
        "approve; admin: every project, and the audit",
    ),
    project: str | None = typer.Option(
        None, "--project", help="the project (not for --role admin)"
    ),
    file: Path | None = typer.Option(
        None,
        "--file",
        help="the tokens file (default: "
        "CICD_RAY_TOKENS_FILE, else the one `up` keeps "
        "in CICD_RAY_HOME)",
    ),
):
    """Make a token: printed once, only its digest, project and role are kept (the file is
    created 0600 if missing). A running API takes it up without a restart."""
    if role is tokens.Role.ADMIN and project:
        raise fail("--role admin is of every project: leave out --project", code=2)
    settings = Settings.from_env()
    path = file or settings.tokens_file or settings.home / "tokens"
    try:
        token, grant = tokens.add_token(path, role, project)
    except CicdError as e:
        raise fail(str(e), code=2) from None
    scope = "every project" if role is tokens.Role.ADMIN else f"project {grant.project}"
    out.print(
        escape(
            f"a {role.value} token of {scope} (id {grant.token_id}), added to "
            f"{path}; it is shown only now:"
        )
    )
    print(token)


@app.command()
def schedules(url: str | None = URL, as_json: bool = AS_JSON):
    """The cron schedules of your token's project (an admin's: all), with their next and
    last runs."""
    from cicd_ray.client import Client

    with reported():
        listed = Client(url).schedules()
    if as_json:
        print(json.dumps(listed, indent=2))
        return
    table = Table(
        "schedule", "project", "cron", "time zone", "runs", "next", "last run", "last error"
    )
    for s in listed:
        runs = f"{s['repository']}@{s['ref']}" if s["repository"] else "(its own pipeline)"
        table.add_row(
            escape(s["name"]),
            s["project"],
            escape(s["cron"]),
            s["timezone"],
            escape(runs),
            _when(s["next_at"]),
            f"{s['last_run']} ({_when(s['last_slot'])})" if s["last_run"] else "-",
            escape(s["last_error"][:80]),
        )
    out.print(table)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


@app.command()
def audit(
    limit: int = typer.Option(50, min=1, max=1000, help="how many, newest first"),
    url: str | None = URL,
    as_json: bool = AS_JSON,
):
    """Who submitted, cancelled, re-ran, approved or rejected what (an admin token's view)."""
    from cicd_ray.client import Client

    with reported():
        records = Client(url).audit(limit)
    if as_json:
        print(json.dumps(records, indent=2))
        return
    table = Table("at", "token", "project", "action", "run", "run's project", "step", "detail")
    for r in records:
        table.add_row(
            _when(r["at"]),
            r["token_id"] or "(cluster)",
            r["project"],
            r["action"],
            r["run_id"],
            r["run_project"],
            escape(r["step"]),
            escape(r["detail"]),
        )
    out.print(table)
