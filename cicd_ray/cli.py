"""The `cicd-ray` command line.

Three places answer a command (see `backends.py`): the HTTP API when `--url` or CICD_RAY_URL is
set; otherwise the master over Ray (`run`, `cancel`: an embedded local Ray, or `--address` /
RAY_ADDRESS); otherwise the store file (`runs`, `status`, `logs`, `workers` work after a run
has ended, with no cluster). Exit codes: 0 succeeded, 1 failed or not found, 2 invalid input.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cicd_ray.backends import HttpRunner, Reader, Runner, StoreReader, follow_run
from cicd_ray.config import Settings, load_pools
from cicd_ray.errors import CicdError, ProblemsError, SpecError
from cicd_ray.protocol import LOG_POLL_S, RunView
from cicd_ray.spec import load_pipeline, plan
from cicd_ray.states import RunState, StepState

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="cicd-ray: run CI/CD pipelines on Ray.")
# Piped output (CI logs, scripts) gets wide tables rather than rich's 80-column default.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False)

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
LOG_TAIL_LINES = 20
STATE_STYLE = {
    "queued": "dim", "running": "cyan", "succeeded": "green", "failed": "red",
    "timed_out": "red", "cancelled": "yellow", "skipped": "dim", "waiting_approval": "magenta",
}

URL = typer.Option(None, "--url", envvar="CICD_RAY_URL",
                   help="the cicd-ray API (else the local store or Ray)")
ADDRESS = typer.Option(None, help="Ray cluster address (else RAY_ADDRESS, else embedded)")
AS_JSON = typer.Option(False, "--json", help="print JSON for scripts")


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)


def _styled(state: str) -> str:
    style = STATE_STYLE.get(state, "")
    return f"[{style}]{state}[/{style}]" if style else state


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _fail(f"--env {pair!r}: expected KEY=VALUE", EXIT_INVALID)
        env[key] = value
    return env


SECRET = typer.Option([], "--secret", "-s", help="NAME: a secret of the run's own, its value "
                      "taken from this shell's variable NAME (never from the command line)")


def _secrets_from_env(names: list[str]) -> dict[str, str]:
    unset = [n for n in names if n not in os.environ]
    if unset:
        raise _fail(f"--secret {unset[0]}: set the variable {unset[0]} in this shell to the "
                    "secret's value (e.g. read -s); it is not taken from the command line",
                    EXIT_INVALID)
    return {n: os.environ[n] for n in names}


def _warn_python(settings: Settings) -> None:
    """Say it before the first step fails: steps with users of their own cannot run a Python
    under root's home."""
    from cicd_ray.isolation import parse_uids, python_warning

    warning = python_warning(parse_uids(settings.step_uids))
    if warning:
        err.print(f"[yellow]warning: {escape(warning)}[/yellow]")


def _reader(url: str | None) -> Reader:
    return HttpRunner(url) if url else StoreReader(Settings.from_env())


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
def run(file: Path = typer.Argument(..., help="the pipeline file"),
        source: Path | None = typer.Option(None, help="directory to snapshot as the source"),
        address: str | None = ADDRESS, url: str | None = URL,
        env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE, overrides env"),
        secret: list[str] = SECRET,
        timeout: float | None = typer.Option(None, help="give up waiting after this many s")):
    """Run a pipeline and follow it to the end. Exit 0 succeeded, 1 failed, 2 invalid."""
    _submit(file, source, address, url, env, follow=True, timeout=timeout, secrets=secret)


@app.command()
def submit(file: Path = typer.Argument(..., help="the pipeline file"),
           source: Path | None = typer.Option(None, help="directory to snapshot as the source"),
           address: str | None = ADDRESS, url: str | None = URL,
           env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE, overrides env"),
           secret: list[str] = SECRET,
           follow: bool = typer.Option(False, "--follow", "-f", help="follow it like `run`"),
           timeout: float | None = typer.Option(None, help="give up waiting after this many s")):
    """Submit a pipeline to a server (--url) or cluster (--address) and print its run id."""
    if not url and not address:
        raise _fail("submit needs --url (or CICD_RAY_URL) or --address: an embedded cluster "
                    "would end with the command; use `cicd-ray run` for that", EXIT_INVALID)
    _submit(file, source, address, url, env, follow=follow, timeout=timeout, secrets=secret)


def _submit(file: Path, source: Path | None, address: str | None, url: str | None,
            env: list[str], follow: bool, timeout: float | None,
            secrets: list[str] = ()) -> None:
    try:
        spec = load_pipeline(file, Settings.from_env().max_pipeline_bytes)
    except ProblemsError as e:
        err.print(f"[red]{escape(str(e))}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    overrides = _parse_env(env)
    own = _secrets_from_env(secrets)
    try:
        with _connected(url, address) as (runner, embedded):
            try:
                run_id = runner.submit(spec, file, source, overrides, own)
            except SpecError as e:
                err.print(f"[red]{escape(str(e))}[/red]")
                raise typer.Exit(EXIT_INVALID) from None
            where = " (embedded local Ray)" if embedded else f" at {url}" if url else ""
            out.print(f"run [bold]{run_id}[/bold] of {spec.name}{where}")
            if follow:
                _follow_to_end(runner, run_id, timeout)
    except CicdError as e:
        raise _fail(str(e)) from None


def _follow_to_end(runner: Runner, run_id: str, timeout: float | None) -> None:
    """Follow a run, print its summary, and exit with its outcome."""
    view = _follow_run(runner, run_id, timeout)
    _print_summary(view, runner)
    raise typer.Exit(EXIT_OK if view.run.state is RunState.SUCCEEDED else EXIT_FAILED)


@contextmanager
def _connected(url: str | None, address: str | None) -> Iterator[tuple[Runner, bool]]:
    """A runner: the API (--url), a cluster (--address or RAY_ADDRESS), else an embedded local
    Ray that ends with the command; and whether it is embedded."""
    if url:  # no Ray imported for the API
        yield HttpRunner(url), False
        return
    from cicd_ray import cluster
    from cicd_ray.backends import RayRunner

    settings = Settings.from_env()
    embedded = cluster.connect(address, settings)
    if embedded:
        _warn_python(settings)
    runner = RayRunner(cluster.ensure_master(settings), settings)
    try:
        yield runner, embedded
    finally:
        if embedded:
            cluster.shutdown_embedded(runner.master)


def _follow_run(runner: Runner, run_id: str, timeout: float | None) -> RunView:
    try:
        return follow_run(runner, run_id, _ProgressPrinter().update, timeout_s=timeout)
    except TimeoutError as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        err.print("interrupted: cancelling the run")
        runner.cancel(run_id)
        return _follow_run(runner, run_id, 60)


class _ProgressPrinter:
    """Prints a line whenever a step changes state: readable live and in a CI log alike."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, int]] = {}
        self.t0 = time.monotonic()

    def update(self, view: RunView) -> None:
        for step in view.steps:
            name, state, attempts = step.name, step.state.value, step.attempts
            if self.seen.get(name) == (state, attempts):
                continue
            self.seen[name] = (state, attempts)
            detail = ""
            if state == "running":
                detail = f"attempt {attempts} on {step.worker_id}"
            elif state in ("failed", "timed_out", "skipped", "cancelled") or (
                    state == "queued" and attempts):
                detail = step.reason
            style = STATE_STYLE.get(state, "")
            out.print(f"{time.monotonic() - self.t0:7.1f}s  {escape(f'{name:<28}')} "
                      f"[{style}]{state:<10}[/{style}] {escape(detail)}")


def _print_summary(view: RunView, reader: Reader) -> None:
    run = view.run
    for step in view.steps:
        if step.state not in (StepState.FAILED, StepState.TIMED_OUT) or not step.current_attempt:
            continue
        text = reader.log(run.id, step.name, None, 0).data
        tail = "\n".join(text.decode(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        out.rule(escape(f"{step.name}: {step.state.value} ({step.reason}) - last lines of its "
                        "log"))
        out.print(tail, markup=False)
    took = (run.finished_at or time.time()) - run.created_at
    counts: dict[str, int] = {}
    for s in view.steps:
        counts[s.state.value] = counts.get(s.state.value, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    out.print(f"run {run.id} {_styled(run.state.value)} in {took:.1f}s ({summary})")


# --- reading runs --------------------------------------------------------------------------------


def _duration(started: float | None, finished: float | None) -> float | None:
    if started is None:
        return None
    return (finished or time.time()) - started


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"


@contextmanager
def _reported():
    """Our errors become a message on stderr and exit code 1."""
    try:
        yield
    except CicdError as e:
        raise _fail(str(e)) from None


@app.command()
def runs(state: RunState | None = typer.Option(None, help="only runs in this state"),
         pipeline: str | None = typer.Option(None, help="only runs of this pipeline"),
         limit: int = typer.Option(20, min=1, max=500), url: str | None = URL,
         as_json: bool = AS_JSON):
    """List recent runs, newest first."""
    with _reported():
        records = _reader(url).list_runs(state.value if state else None, pipeline, limit)
    if as_json:
        out.print_json(data=records)
        return
    table = Table("run", "pipeline", "state", "created", "duration")
    for r in records:
        table.add_row(r["id"], r["pipeline"], _styled(r["state"]),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])),
                      _fmt_s(_duration(r["started_at"], r["finished_at"])))
    out.print(table)


@app.command()
def status(run_id: str, url: str | None = URL, as_json: bool = AS_JSON):
    """Show a run's steps: state, attempts, where the time went, worker."""
    with _reported():
        view = _reader(url).view(run_id)
    if as_json:
        out.print_json(data=view.model_dump(mode="json"))
        return
    run = view.run
    out.print(f"run {run.id} of {run.pipeline}: {_styled(run.state.value)} {escape(run.reason)}")
    out.print(escape(f"project {run.project}; started by {_trigger(run)}"))
    if run.commit and run.source_git:
        out.print(escape(f"commit {run.commit} ({run.source_git.ref} of {run.source_git.git})"))
    elif run.source_digest:
        out.print(f"source snapshot sha256:{run.source_digest}")
    if run.rerun_of:
        out.print(f"a re-run of run {run.rerun_of}")
    out.print(_steps_table(view))
    from cicd_ray.buildcli import build_notes
    from cicd_ray.flowcli import flow_notes

    for line in build_notes(view) + flow_notes(view):
        out.print(escape(line))
    shared = sorted({a.runs_as for a in view.attempts if "worker's user" in a.runs_as})
    if shared:
        out.print(f"steps ran as {', '.join(shared)}, not as a user of their own: they could "
                  "read what their worker can (see docs/security.md)")


def _trigger(run) -> str:
    """What started a run, in words: `manual`, `push to main of acme/app`, ..."""
    if run.event == "push":
        return f"a push to {run.branch} of {run.repo}"
    if run.event == "pull_request":
        return f"pull request {run.pr} ({run.branch}) of {run.repo}"
    if run.event == "schedule":
        slot = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.scheduled_for or 0))
        return f"a schedule (its slot of {slot})"
    return "hand (API, CLI or client)"


def _steps_table(view: RunView) -> Table:
    last_attempt = {a.step: a for a in view.attempts}
    table = Table("step", "state", "attempts", "wait slot", "wait capacity", "ran", "worker",
                  "exit", "peak MiB", "reason")
    for s in view.steps:
        last = last_attempt.get(s.name)
        peak = last and last.peak_memory_mb
        ran = last and _duration(last.started_at, last.finished_at)
        table.add_row(
            escape(s.name), _styled(s.state.value), str(s.attempts),
            _fmt_s(last.wait_slot_s) if last else "",
            _fmt_s(last.wait_capacity_s) if last else "", _fmt_s(ran), s.worker_id or "",
            "" if s.exit_code is None else str(s.exit_code),
            f"{peak:.0f}" if peak else "", escape(s.reason),
        )
    return table


@app.command()
def logs(run_id: str, step: str,
         attempt: int | None = typer.Option(None, help="which attempt (default: the last)"),
         follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the "
                                     "attempt ends"),
         url: str | None = URL, as_json: bool = AS_JSON):
    """Print a step's log (its last attempt unless --attempt is given)."""
    with _reported():
        reader = _reader(url)
        answer = reader.log(run_id, step, attempt, 0)
        if answer.attempt is None and not follow:
            raise CicdError(f"step {step!r} has not started, so it has no log yet")
    if as_json:
        out.print_json(data={"run_id": run_id, "step": step, "attempt": answer.attempt,
                             "state": answer.state,
                             "log": answer.data.decode(errors="replace")})
        return
    offset = 0
    while True:
        sys.stdout.buffer.write(answer.data)
        sys.stdout.flush()
        offset += len(answer.data)
        if not follow or not answer.more:
            return
        time.sleep(LOG_POLL_S)
        with _reported():
            answer = reader.log(run_id, step, answer.attempt, offset)


@app.command()
def cancel(run_id: str, url: str | None = URL, address: str | None = ADDRESS):
    """Cancel a run on a server (--url) or cluster (--address). Idempotent."""
    with _reported(), _control(url, address, "cancel") as (runner, _):
        state = runner.cancel(run_id)
    out.print(f"run {run_id}: {_styled(state)}")


def _bytes(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _control(url: str | None, address: str | None, command: str):
    """Where a command that changes runs goes: the API (--url) or a cluster (--address); an
    embedded cluster would end with the command."""
    if not url and not address:
        raise _fail(f"{command} needs --url (or CICD_RAY_URL) or --address", EXIT_INVALID)
    return _connected(url, address)


@app.command()
def workers(url: str | None = URL, as_json: bool = AS_JSON):
    """List the workers: pool, state, CPUs in use, last heartbeat, resource use."""
    with _reported():
        records = _reader(url).workers()
    if as_json:
        out.print_json(data=records)
        return
    table = Table("worker", "pool", "state", "cpus", "in use", "heartbeat", "cpu %", "mem MiB",
                  "net out/s", "net in/s", "steps run as")
    now = time.time()
    for w in records:
        beat = w.get("last_heartbeat")
        table.add_row(w["id"], w["pool"], w["state"], f"{w['cpus']:g}",
                      f"{w.get('cpus_in_use', 0):g}" if "cpus_in_use" in w else "",
                      f"{now - beat:.0f}s ago" if beat else "",
                      f"{w['cpu_percent']:.0f}" if w.get("cpu_percent") is not None else "",
                      f"{w['memory_used_mb']:.0f}" if w.get("memory_used_mb") else "",
                      _bytes(w.get("net_sent_bytes_per_s")),
                      _bytes(w.get("net_recv_bytes_per_s")),
                      escape(w.get("isolation", "")))
    out.print(table)


# --- the server ---------------------------------------------------------------------------------


@app.command()
def up(port: int = typer.Option(8000, help="the API's port"),
       host: str = typer.Option("127.0.0.1", help="the address the API listens on"),
       address: str | None = typer.Option(None, help="join this Ray cluster instead of "
                                          "starting a local head"),
       ha: str | None = typer.Option(
           None, help="GCS fault tolerance: keep the head's GCS tables in this Redis "
           "(redis://[:PASSWORD@]HOST:PORT); `up` again after the head died replaces it"),
       ha_namespace: str = typer.Option("cicd-ray", help="the GCS's key prefix in that Redis "
                                        "(one per cluster)"),
       head_cpus: int | None = typer.Option(None, help="CPUs the head offers (0: steps and "
                                            "workers only on worker nodes)"),
       proxy_location: str = typer.Option("EveryNode", help="Serve's HTTP proxies: EveryNode "
                                          "(the API survives the head) or HeadOnly"),
       ray_port: int | None = typer.Option(None, help="the new head's GCS port (Ray's "
                                           "default: 6379)"),
       dashboard_port: int | None = typer.Option(None, help="the new head's dashboard and "
                                                 "job API port (Ray's default: 8265)"),
       local_autoscaling: Path | None = typer.Option(
           None, exists=True, dir_okay=False, help="a pools file: start a local autoscaling "
           "cluster (Ray's fake multi-node provider) with a node type per pool"),
       node_idle_timeout: float = typer.Option(60.0, help="with --local-autoscaling: seconds "
                                               "an idle node lives")):
    """Start (or join) a Ray cluster with the master and the HTTP API, and leave it running."""
    from cicd_ray import server

    try:
        options = server.Ha.from_url(ha, ha_namespace) if ha else None
        settings = Settings.from_env()
        _warn_python(settings)
        started = server.up(settings, host=host, port=port, address=address,
                            ha=options, head_cpus=head_cpus, proxy_location=proxy_location,
                            ray_port=ray_port, local_autoscaling=local_autoscaling,
                            node_idle_timeout_s=node_idle_timeout,
                            dashboard_port=dashboard_port)
    except CicdError as e:
        raise _fail(str(e)) from None
    how = (" (a new head replaced the one that died)" if started.replaced_head
           else " (the head an earlier `cicd-ray up` started)" if started.reused_head
           else " (a local head started for it)" if started.started_head else "")
    out.print(f"cicd-ray is up on Ray at {started.address}{how}"
              f"{'; GCS fault tolerance on ' + options.redis_address if options else ''}")
    out.print(f"  API:        {started.api_url}   "
              f"(OpenAPI: {started.api_url}/openapi.json, with the token)")
    if started.dashboard_url:
        out.print(f"  dashboard:  {started.dashboard_url}   (Ray's token: `ray get-auth-token`)")
    if started.token:
        out.print("  a new API token was created; it is shown only now:")
        out.print(f"    export CICD_RAY_URL={started.api_url}")
        out.print(f"    export CICD_RAY_TOKEN={started.token}")
    else:
        out.print(f"  authenticate with a configured token: export CICD_RAY_URL="
                  f"{started.api_url} CICD_RAY_TOKEN=<your token>")
    out.print("  stop it with: cicd-ray down")


@app.command()
def down(address: str | None = typer.Option(None, help="the cluster, if not the one `up` "
                                            "recorded")):
    """Stop what `cicd-ray up` started."""
    from cicd_ray import server

    try:
        stopped = server.down(Settings.from_env(), address=address)
    except CicdError as e:
        raise _fail(str(e)) from None
    out.print("stopped " + ", ".join(stopped))


def _since(text: str, option: str = "--since") -> float:
    """`7d`, `12h`, `30m` or `90s` ago, as a Unix time."""
    from cicd_ray.retention import parse_duration

    try:
        return time.time() - parse_duration(text)
    except CicdError:
        raise typer.BadParameter(f"{text!r}: expected an age such as 7d, 12h, 30m or 90s",
                                 param_hint=option) from None


def _history(reader: Reader, pipeline: str | None, since: float, limit: int) -> list[dict]:
    """Views of the runs (of a pipeline) created since `since`, newest first, as JSON (what
    cicd_ray.usage reads)."""
    runs = [r for r in reader.list_runs(None, pipeline, limit) if r["created_at"] >= since]
    return [reader.view(r["id"]).model_dump(mode="json") for r in runs]


@app.command()
def recommend(pipeline: str = typer.Argument(..., help="the pipeline's name"),
              since: str = typer.Option("30d", help="history to learn from"),
              runs: int = typer.Option(50, min=1, max=500, help="at most this many runs"),
              url: str | None = URL, as_json: bool = AS_JSON):
    """Suggest each step's resources from what its attempts used (95th percentile + 20%), and
    flag steps asking far more or less than they use."""
    from dataclasses import asdict

    from cicd_ray.usage import recommend as advise

    cutoff = _since(since)
    with _reported():
        advice = advise(_history(_reader(url), pipeline, cutoff, runs))
    if as_json:
        out.print_json(data=[asdict(a) for a in advice])
        return
    if not advice:
        raise _fail(f"no runs of pipeline {pipeline!r} since {since} ago")
    table = Table("step", "runs", "asks cpu", "uses cpu p95", "suggest cpu", "asks MiB",
                  "uses MiB p95", "suggest MiB", "note")
    for a in advice:
        table.add_row(escape(a.step), str(a.samples), f"{a.asked_cpu:g}",
                      "" if a.used_cpu_p95 is None else f"{a.used_cpu_p95:.2f}",
                      "" if a.cpu is None else f"{a.cpu:g}", str(a.asked_memory_mb),
                      "" if a.used_memory_mb_p95 is None else f"{a.used_memory_mb_p95:.0f}",
                      "" if a.memory_mb is None else str(a.memory_mb), escape(a.note))
    out.print(table)


@app.command()
def cost(since: str = typer.Option("7d", help="the period, back from now"),
         runs: int = typer.Option(500, min=1, max=500, help="at most this many runs"),
         url: str | None = URL, as_json: bool = AS_JSON):
    """Worker-seconds and money per pool (workers' lifetimes) and per pipeline (each attempt's
    share of its worker), at the prices of the pools file (CICD_RAY_POOLS)."""
    from dataclasses import asdict

    from cicd_ray.usage import pipeline_costs, pool_costs

    cutoff = _since(since)
    pools = Settings.from_env().pools
    with _reported():
        reader = _reader(url)
        by_pool = pool_costs(reader.workers(cutoff), pools, cutoff, time.time())
        by_pipeline = pipeline_costs(_history(reader, None, cutoff, runs), pools, cutoff)
    if as_json:
        out.print_json(data={"pools": [asdict(c) for c in by_pool],
                             "pipelines": [asdict(c) for c in by_pipeline]})
        return
    for title, rows in (("pool", by_pool), ("pipeline", by_pipeline)):
        table = Table(title, "worker-hours", "cost")
        for c in rows:
            table.add_row(escape(c.name), f"{c.worker_seconds / 3600:.3f}", f"{c.money:.2f}")
        out.print(table)


@app.command()
def gc(older_than: str | None = typer.Option(None, help="delete finished runs (with their "
                                            "logs) and stopped workers older than this, e.g. "
                                            "7d (default: CICD_RAY_RETENTION_DAYS, 30 days)"),
       dry_run: bool = typer.Option(False, "--dry-run", help="count what would go; delete "
                                    "nothing"),
       as_json: bool = AS_JSON):
    """Delete what is past retention from the store: finished runs with their steps, attempts
    and logs, stopped workers' records, Idempotency-Keys older than a day, source archives
    no queued or running run needs, and artifacts no stored step or reusable result points at.
    The master does this by itself every hour."""
    from cicd_ray.artifacts import ArtifactStore
    from cicd_ray.retention import collect
    from cicd_ray.store import open_store

    settings = Settings.from_env()
    now = time.time()
    cutoff = _since(older_than, "--older-than") if older_than else (
        now - settings.retention_days * 86400)
    with _reported():
        store = open_store(settings.store_url)
        try:
            done = collect(store, now, now - cutoff, dry_run=dry_run,
                           artifacts=ArtifactStore(settings.artifacts_url))
        finally:
            store.close()
    if as_json:
        out.print_json(data={"dry_run": dry_run, **done.as_dict()})
        return
    verb = "would delete" if dry_run else "deleted"
    out.print(f"{verb} {done.runs} run(s) with their logs, {done.sources} source archive(s), "
              f"{done.keys} idempotency key(s), {done.workers} worker record(s), "
              f"{done.artifacts} artifact file(s)")


@app.command()
def kuberay(pools: Path = typer.Argument(..., exists=True, dir_okay=False,
                                         help="the pools file"),
            image: str = typer.Option("registry.example.com/cicd-ray:0.1.0",
                                      help="the image built from kuberay/Dockerfile")):
    """Print the KubeRay manifests (a ConfigMap with the pools, the RayService) for a pools
    file (and the projects it lists): `cicd-ray kuberay kuberay/pools.yaml >
    kuberay/rayservice.yaml`."""
    import ray

    from cicd_ray.kuberay import projects_of, render

    try:
        text = render(load_pools(pools), pools.read_text(encoding="utf-8"), image,
                      ray.__version__, projects_of(pools))
    except CicdError as e:
        raise _fail(str(e)) from None
    sys.stdout.write(text)


# The commands of builds (artifacts, explain, rerun) live in their own module; importing it
# adds them to `app`.
from cicd_ray import buildcli, flowcli, tenantcli  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":
    # Run as `python -m cicd_ray.cli`, this file is __main__; the build commands register on
    # the app of `cicd_ray.cli`, the module proper, so that is the one to run.
    from cicd_ray.cli import main as main_of_the_module

    main_of_the_module()
