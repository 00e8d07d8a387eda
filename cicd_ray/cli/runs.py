"""The commands of runs: `validate`, `run`, `submit`, `runs`, `status`, `logs`, `cancel`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from cicd_ray.cli.connect import connected, control, reader_for
from cicd_ray.cli.root import (
    ADDRESS,
    AS_JSON,
    EXIT_INVALID,
    SECRET,
    URL,
    app,
    err,
    fail,
    out,
    parse_env,
    reported,
    secrets_from_env,
)
from cicd_ray.cli.show import (
    build_notes,
    duration,
    flow_notes,
    follow_to_end,
    human_seconds,
    steps_table,
    styled,
    trigger_of,
)
from cicd_ray.config import Settings
from cicd_ray.errors import CicdError, ProblemsError, SpecError
from cicd_ray.pipeline.graph import plan
from cicd_ray.pipeline.load import load_pipeline
from cicd_ray.protocol import LOG_POLL_S
from cicd_ray.states import RunState


@app.command()
def validate(file: Path = typer.Argument(..., help="the pipeline file"), as_json: bool = AS_JSON):
    """Check a pipeline file; exit 2 listing every problem."""
    try:
        spec = load_pipeline(file, Settings.from_env().max_pipeline_bytes)
    except ProblemsError as e:  # the pipeline's, or the settings'
        if as_json:
            out.print_json(data={"valid": False, "problems": e.problems})
        else:
            err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    steps = plan(spec, strict=False)  # group variables may come with the submission's env
    if as_json:
        out.print_json(data={"valid": True, "name": spec.name, "steps": [s.name for s in steps]})
    else:
        out.print(f"{file}: valid pipeline {spec.name!r} with {len(steps)} step(s)")


@app.command()
def run(
    file: Path = typer.Argument(..., help="the pipeline file"),
    source: Path | None = typer.Option(None, help="directory to snapshot as the source"),
    address: str | None = ADDRESS,
    url: str | None = URL,
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE, overrides env"),
    secret: list[str] = SECRET,
    timeout: float | None = typer.Option(None, help="give up waiting after this many s"),
):
    """Run a pipeline and follow it to the end. Exit 0 succeeded, 1 failed, 2 invalid."""
    _submit(file, source, address, url, env, follow=True, timeout=timeout, secrets=secret)


@app.command()
def submit(
    file: Path = typer.Argument(..., help="the pipeline file"),
    source: Path | None = typer.Option(None, help="directory to snapshot as the source"),
    address: str | None = ADDRESS,
    url: str | None = URL,
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE, overrides env"),
    secret: list[str] = SECRET,
    follow: bool = typer.Option(False, "--follow", "-f", help="follow it like `run`"),
    timeout: float | None = typer.Option(None, help="give up waiting after this many s"),
):
    """Submit a pipeline to a server (--url) or cluster (--address) and print its run id."""
    if not url and not address:
        raise fail(
            "submit needs --url (or CICD_RAY_URL) or --address: an embedded cluster "
            "would end with the command; use `cicd-ray run` for that",
            EXIT_INVALID,
        )
    _submit(file, source, address, url, env, follow=follow, timeout=timeout, secrets=secret)


def _submit(
    file: Path,
    source: Path | None,
    address: str | None,
    url: str | None,
    env: list[str],
    follow: bool,
    timeout: float | None,
    secrets: list[str] = (),
) -> None:
    try:
        spec = load_pipeline(file, Settings.from_env().max_pipeline_bytes)
    except ProblemsError as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    overrides = parse_env(env)
    own = secrets_from_env(secrets)
    try:
        with connected(url, address) as (runner, embedded):
            try:
                run_id = runner.submit(spec, file, source, overrides, own)
            except SpecError as e:
                err.print(f"[red]{escape(str(e))}[/red]")
                raise typer.Exit(EXIT_INVALID) from None
            where = " (embedded local Ray)" if embedded else f" at {url}" if url else ""
            out.print(f"run [bold]{run_id}[/bold] of {spec.name}{where}")
            if follow:
                follow_to_end(runner, run_id, timeout)
    except CicdError as e:
        raise fail(str(e)) from None


@app.command()
def runs(
    state: RunState | None = typer.Option(None, help="only runs in this state"),
    pipeline: str | None = typer.Option(None, help="only runs of this pipeline"),
    limit: int = typer.Option(20, min=1, max=500),
    url: str | None = URL,
    as_json: bool = AS_JSON,
):
    """List recent runs, newest first."""
    with reported():
        records = reader_for(url).list_runs(state.value if state else None, pipeline, limit)
    if as_json:
        out.print_json(data=[r.model_dump(mode="json") for r in records])
        return
    table = Table("run", "pipeline", "state", "created", "duration")
    for r in records:
        table.add_row(
            r.id,
            r.pipeline,
            styled(r.state.value),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)),
            human_seconds(duration(r.started_at, r.finished_at)),
        )
    out.print(table)


@app.command()
def status(run_id: str, url: str | None = URL, as_json: bool = AS_JSON):
    """Show a run's steps: state, attempts, where the time went, worker."""
    with reported():
        view = reader_for(url).view(run_id)
    if as_json:
        out.print_json(data=view.model_dump(mode="json"))
        return
    run = view.run
    out.print(f"run {run.id} of {run.pipeline}: {styled(run.state.value)} {escape(run.reason)}")
    out.print(escape(f"project {run.project}; started by {trigger_of(run)}"))
    if run.commit and run.source_git:
        out.print(escape(f"commit {run.commit} ({run.source_git.ref} of {run.source_git.git})"))
    elif run.source_digest:
        out.print(f"source snapshot sha256:{run.source_digest}")
    if run.rerun_of:
        out.print(f"a re-run of run {run.rerun_of}")
    out.print(steps_table(view))

    for line in build_notes(view) + flow_notes(view):
        out.print(escape(line))
    shared = sorted({a.runs_as for a in view.attempts if "worker's user" in a.runs_as})
    if shared:
        out.print(
            f"steps ran as {', '.join(shared)}, not as a user of their own: they could "
            "read what their worker can (see docs/security.md)"
        )


@app.command()
def logs(
    run_id: str,
    step: str,
    attempt: int | None = typer.Option(None, help="which attempt (default: the last)"),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="keep printing until the attempt ends"
    ),
    url: str | None = URL,
    as_json: bool = AS_JSON,
):
    """Print a step's log (its last attempt unless --attempt is given)."""
    with reported():
        reader = reader_for(url)
        answer = reader.log(run_id, step, attempt, 0)
        if answer.attempt is None and not follow:
            raise CicdError(f"step {step!r} has not started, so it has no log yet")
    if as_json:
        out.print_json(
            data={
                "run_id": run_id,
                "step": step,
                "attempt": answer.attempt,
                "state": answer.state,
                "log": answer.data.decode(errors="replace"),
            }
        )
        return
    offset = 0
    while True:
        sys.stdout.buffer.write(answer.data)
        sys.stdout.flush()
        offset += len(answer.data)
        if not follow or not answer.more:
            return
        time.sleep(LOG_POLL_S)
        with reported():
            answer = reader.log(run_id, step, answer.attempt, offset)


@app.command()
def cancel(run_id: str, url: str | None = URL, address: str | None = ADDRESS):
    """Cancel a run on a server (--url) or cluster (--address). Idempotent."""
    with reported(), control(url, address, "cancel") as (runner, _):
        state = runner.cancel(run_id)
    out.print(f"run {run_id}: {styled(state)}")
