"""The commands of builds: `artifacts`, `explain`, `rerun`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from cicd_ray.cli.connect import connected, reader_for
from cicd_ray.cli.root import ADDRESS, AS_JSON, URL, app, fail, out, reported
from cicd_ray.cli.show import follow_to_end
from cicd_ray.errors import CicdError
from cicd_ray.reads.artifacts import artifact_list


@app.command()
def artifacts(
    run_id: str,
    step: str | None = typer.Option(None, "--step", help="only this step's"),
    download: Path | None = typer.Option(
        None, "--download", help="save them under this folder, as STEP/PATH"
    ),
    url: str | None = URL,
    as_json: bool = AS_JSON,
):
    """List the files a run's steps kept (their `artifacts:`), or download them."""
    with reported():
        reader = reader_for(url)
        view = reader.view(run_id)
        if step is not None and step not in {s.name for s in view.steps}:
            raise CicdError(f"run {run_id} has no step {step!r}")
        files = artifact_list(view, step)
        if download is not None:
            for f in files:
                reader.fetch(run_id, f, download / f["step"] / f["path"])
    if as_json:
        out.print_json(data={"run_id": run_id, "artifacts": files})
        return
    table = Table("step", "path", "bytes", "sha256", "from run")
    for f in files:
        table.add_row(
            escape(f["step"]),
            escape(f["path"]),
            str(f["size"]),
            f["digest"][:16],
            "" if f["from_run"] == run_id else f["from_run"],
        )
    out.print(table)
    if download is not None:
        out.print(f"saved {len(files)} file(s) under {download}")


@app.command()
def explain(run_id: str, step: str, url: str | None = URL, as_json: bool = AS_JSON):
    """Why a step ran instead of being reused: the parts of its key that changed since the
    last success of the same step of the same pipeline."""
    with reported():
        said = reader_for(url).explain(run_id, step)
    if as_json:
        out.print_json(data=said.model_dump(mode="json"))
        return
    out.print(escape(f"{step} in run {run_id} ({said.state}): {said.summary}"))
    for change in said.changed:
        out.print(escape(f"  {change.part}: {change.detail}"))


@app.command()
def rerun(
    run_id: str,
    failed: bool = typer.Option(
        False,
        "--failed",
        help="only the failed, timed-out, "
        "cancelled and skipped steps, and what needs them; the "
        "successes are carried over with their artifacts",
    ),
    follow: bool = typer.Option(False, "--follow", "-f", help="follow it like `run`"),
    url: str | None = URL,
    address: str | None = ADDRESS,
    timeout: float | None = typer.Option(None, help="give up waiting after this many s"),
):
    """Run a finished run again: the same pipeline on the same commit and inputs, linked to it.
    Prints the new run's id; without --url or --address it runs on an embedded local Ray and
    is followed to its end, like `run`."""
    try:
        with connected(url, address) as (runner, embedded):
            new_id = runner.rerun(run_id, failed)
            out.print(new_id)
            if follow or embedded:
                follow_to_end(runner, new_id, timeout)
    except CicdError as e:
        raise fail(str(e)) from None
