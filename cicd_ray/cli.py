"""The `cicd-ray` command line.

`validate` and `run` work on pipeline files; `runs`, `status` and `logs` read the store directly,
so they work after a run has ended, with no cluster running. Exit codes: 0 succeeded, 1 failed
(or not found), 2 invalid input.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cicd_ray.config import Settings
from cicd_ray.errors import CicdError, SpecError
from cicd_ray.records import AttemptRecord, RunRecord, StepRecord
from cicd_ray.spec import load_pipeline, plan
from cicd_ray.states import RunState, StepState
from cicd_ray.store import SqliteStore

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="cicd-ray: run CI/CD pipelines on Ray.")
# Piped output (CI logs, scripts) gets wide tables rather than rich's 80-column default.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False)

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
LOG_TAIL_LINES = 20
STATE_STYLE = {
    "queued": "dim", "running": "cyan", "succeeded": "green", "failed": "red",
    "timed_out": "red", "cancelled": "yellow", "skipped": "dim",
}


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _fail(f"--env {pair!r}: expected KEY=VALUE", EXIT_INVALID)
        env[key] = value
    return env


@app.command()
def validate(file: Path = typer.Argument(..., help="the pipeline file"),
             as_json: bool = typer.Option(False, "--json", help="print the result as JSON")):
    """Check a pipeline file; exit 2 listing every problem."""
    try:
        spec = load_pipeline(file)
    except SpecError as e:
        if as_json:
            out.print_json(data={"valid": False, "problems": e.problems})
        else:
            err.print(f"[red]{e}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    steps = plan(spec)
    if as_json:
        out.print_json(data={"valid": True, "name": spec.name, "steps": [s.name for s in steps]})
    else:
        out.print(f"{file}: valid pipeline {spec.name!r} with {len(steps)} step(s)")


@app.command()
def run(file: Path = typer.Argument(..., help="the pipeline file"),
        source: Path | None = typer.Option(None, help="directory to snapshot as the source"),
        address: str | None = typer.Option(None, help="Ray cluster address (else RAY_ADDRESS, "
                                           "else an embedded local Ray)"),
        env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE, overrides env"),
        timeout: float | None = typer.Option(None, help="give up waiting after this many s")):
    """Run a pipeline and follow it to the end. Exit 0 succeeded, 1 failed, 2 invalid."""
    from cicd_ray import cluster

    try:
        spec = load_pipeline(file)
    except SpecError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    overrides = _parse_env(env)
    settings = Settings.from_env()
    embedded = cluster.connect(address, settings)
    master = None
    try:
        master = cluster.ensure_master(settings)
        try:
            run_id = cluster.submit(master, spec, file.resolve().parent, source, overrides,
                                    settings)
        except SpecError as e:
            err.print(f"[red]{e}[/red]")
            raise typer.Exit(EXIT_INVALID) from None
        out.print(f"run [bold]{run_id}[/bold] of {spec.name}"
                  f"{' (embedded local Ray)' if embedded else ''}")
        printer = _ProgressPrinter()
        try:
            view = cluster.follow(master, run_id, printer.update, timeout_s=timeout)
        except KeyboardInterrupt:
            err.print("interrupted: cancelling the run")
            cluster.call(master.cancel.remote(run_id))
            view = cluster.follow(master, run_id, printer.update, timeout_s=60)
        except TimeoutError as e:
            raise _fail(str(e)) from None
        _print_summary(view, master)
        raise typer.Exit(EXIT_OK if view["run"]["state"] == RunState.SUCCEEDED else EXIT_FAILED)
    except CicdError as e:
        raise _fail(str(e)) from None
    finally:
        if embedded and master is not None:
            cluster.shutdown_embedded(master)


class _ProgressPrinter:
    """Prints a line whenever a step changes state: readable live and in a CI log alike."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, int]] = {}
        self.t0 = time.monotonic()

    def update(self, view: dict) -> None:
        for step in view["steps"]:
            name, state, attempts = step["spec"]["name"], step["state"], step["attempts"]
            if self.seen.get(name) == (state, attempts):
                continue
            self.seen[name] = (state, attempts)
            detail = ""
            if state == "running":
                detail = f"attempt {attempts} on {step['worker_id']}"
            elif state in ("failed", "timed_out", "skipped", "cancelled") or (
                    state == "queued" and attempts):
                detail = step["reason"]
            style = STATE_STYLE.get(state, "")
            out.print(f"{time.monotonic() - self.t0:7.1f}s  {escape(f'{name:<28}')} "
                      f"[{style}]{state:<10}[/{style}] {escape(detail)}")


def _print_summary(view: dict, master) -> None:
    from cicd_ray.cluster import call

    run = view["run"]
    steps = [StepRecord.model_validate(s) for s in view["steps"]]
    bad = [s for s in steps if s.state in (StepState.FAILED, StepState.TIMED_OUT)]
    for step in bad:
        if step.current_attempt:
            text = call(master.read_log.remote(step.current_attempt)).decode(errors="replace")
            tail = "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
            out.rule(escape(f"{step.name}: {step.state.value} ({step.reason}) - last lines of "
                            "its log"))
            out.print(tail, markup=False)
    took = (run["finished_at"] or time.time()) - run["created_at"]
    style = STATE_STYLE.get(run["state"], "")
    counts: dict[str, int] = {}
    for s in steps:
        counts[s.state.value] = counts.get(s.state.value, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    out.print(f"run {run['id']} [{style}]{run['state']}[/{style}] in {took:.1f}s ({summary})")


# --- reading the store: no cluster needed ------------------------------------------------------


def _store() -> SqliteStore:
    path = Settings.from_env().store_path
    if not path.exists():
        raise _fail(f"no runs yet: the store {path} does not exist (set CICD_RAY_HOME?)")
    return SqliteStore(path)


def _duration(started: float | None, finished: float | None) -> float | None:
    if started is None:
        return None
    return (finished or time.time()) - started


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"


@app.command()
def runs(state: RunState | None = typer.Option(None, help="only runs in this state"),
         pipeline: str | None = typer.Option(None, help="only runs of this pipeline"),
         limit: int = typer.Option(20, min=1, max=1000),
         as_json: bool = typer.Option(False, "--json")):
    """List recent runs, newest first."""
    records = _store().list_runs(state=state, pipeline=pipeline, limit=limit)
    if as_json:
        out.print_json(data=[r.model_dump(mode="json") for r in records])
        return
    table = Table("run", "pipeline", "state", "created", "duration")
    for r in records:
        style = STATE_STYLE.get(r.state.value, "")
        table.add_row(r.id, r.pipeline, f"[{style}]{r.state.value}[/{style}]",
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)),
                      _fmt_s(_duration(r.started_at, r.finished_at)))
    out.print(table)


def _load_run(store: SqliteStore, run_id: str) -> tuple[RunRecord, list[StepRecord]]:
    run_record = store.get_run(run_id)
    if run_record is None:
        raise _fail(f"run {run_id!r} not found; `cicd-ray runs` lists the runs")
    return run_record, store.get_steps(run_id)


@app.command()
def status(run_id: str, as_json: bool = typer.Option(False, "--json")):
    """Show a run's steps: state, attempts, duration, worker."""
    store = _store()
    run_record, steps = _load_run(store, run_id)
    attempts = store.get_attempts(run_id)
    if as_json:
        out.print_json(data={
            "run": run_record.model_dump(mode="json"),
            "steps": [s.model_dump(mode="json") for s in steps],
            "attempts": [a.model_dump(mode="json") for a in attempts],
        })
        return
    style = STATE_STYLE.get(run_record.state.value, "")
    out.print(f"run {run_record.id} of {run_record.pipeline}: "
              f"[{style}]{run_record.state.value}[/{style}] {escape(run_record.reason)}")
    by_step: dict[str, list[AttemptRecord]] = {}
    for a in attempts:
        by_step.setdefault(a.step, []).append(a)
    table = Table("step", "state", "attempts", "duration", "worker", "exit", "peak MiB", "reason")
    for s in steps:
        last = by_step.get(s.name, [None])[-1]
        style = STATE_STYLE.get(s.state.value, "")
        table.add_row(
            escape(s.name), f"[{style}]{s.state.value}[/{style}]", str(s.attempts),
            _fmt_s(_duration(s.started_at, s.finished_at)), s.worker_id or "",
            "" if s.exit_code is None else str(s.exit_code),
            "" if last is None or last.peak_memory_mb is None else f"{last.peak_memory_mb:.0f}",
            escape(s.reason),
        )
    out.print(table)


@app.command()
def logs(run_id: str, step: str,
         attempt: int | None = typer.Option(None, help="which attempt (default: the last)"),
         as_json: bool = typer.Option(False, "--json")):
    """Print a step's log (its last attempt unless --attempt is given)."""
    store = _store()
    _, steps = _load_run(store, run_id)
    names = [s.name for s in steps]
    if step not in names:
        raise _fail(f"run {run_id} has no step {step!r}; its steps are: {', '.join(names)}")
    attempts = store.get_attempts(run_id, step)
    if not attempts:
        raise _fail(f"step {step!r} has not started, so it has no log yet")
    chosen = attempts[-1] if attempt is None else next(
        (a for a in attempts if a.number == attempt), None)
    if chosen is None:
        raise _fail(f"step {step!r} has attempts 1 to {len(attempts)}, not {attempt}")
    data = store.read_log(chosen.id)
    if as_json:
        out.print_json(data={"run_id": run_id, "step": step, "attempt": chosen.number,
                             "state": chosen.state.value, "log": data.decode(errors="replace")})
        return
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
