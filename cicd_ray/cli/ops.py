"""The commands of operations: `workers`, `recommend`, `cost`, `gc`."""

from __future__ import annotations

import time

import typer
from rich.markup import escape
from rich.table import Table

from cicd_ray.cli.connect import Reader, reader_for
from cicd_ray.cli.root import AS_JSON, URL, app, fail, out, parse_since, reported
from cicd_ray.cli.show import human_bytes
from cicd_ray.config import Settings
from cicd_ray.store import open_store


@app.command()
def workers(url: str | None = URL, as_json: bool = AS_JSON):
    """List the workers: pool, state, CPUs in use, last heartbeat, resource use."""
    with reported():
        records = reader_for(url).workers()
    if as_json:
        out.print_json(data=records)
        return
    table = Table(
        "worker",
        "pool",
        "state",
        "cpus",
        "in use",
        "heartbeat",
        "cpu %",
        "mem MiB",
        "net out/s",
        "net in/s",
        "steps run as",
    )
    now = time.time()
    for w in records:
        beat = w.get("last_heartbeat")
        table.add_row(
            w["id"],
            w["pool"],
            w["state"],
            f"{w['cpus']:g}",
            f"{w.get('cpus_in_use', 0):g}" if "cpus_in_use" in w else "",
            f"{now - beat:.0f}s ago" if beat else "",
            f"{w['cpu_percent']:.0f}" if w.get("cpu_percent") is not None else "",
            f"{w['memory_used_mb']:.0f}" if w.get("memory_used_mb") else "",
            human_bytes(w.get("net_sent_bytes_per_s")),
            human_bytes(w.get("net_recv_bytes_per_s")),
            escape(w.get("isolation", "")),
        )
    out.print(table)


def _history(reader: Reader, pipeline: str | None, since: float, limit: int) -> list[dict]:
    """Views of the runs (of a pipeline) created since `since`, newest first, as JSON (what
    cicd_ray.reads.usage reads)."""
    runs = [r for r in reader.list_runs(None, pipeline, limit) if r.created_at >= since]
    return [reader.view(r.id).model_dump(mode="json") for r in runs]


@app.command()
def recommend(
    pipeline: str = typer.Argument(..., help="the pipeline's name"),
    since: str = typer.Option("30d", help="history to learn from"),
    runs: int = typer.Option(50, min=1, max=500, help="at most this many runs"),
    url: str | None = URL,
    as_json: bool = AS_JSON,
):
    """Suggest each step's resources from what its attempts used (95th percentile + 20%), and
    flag steps asking far more or less than they use."""
    from dataclasses import asdict

    from cicd_ray.reads.usage import recommend as advise

    cutoff = parse_since(since)
    with reported():
        advice = advise(_history(reader_for(url), pipeline, cutoff, runs))
    if as_json:
        out.print_json(data=[asdict(a) for a in advice])
        return
    if not advice:
        raise fail(f"no runs of pipeline {pipeline!r} since {since} ago")
    table = Table(
        "step",
        "runs",
        "asks cpu",
        "uses cpu p95",
        "suggest cpu",
        "asks MiB",
        "uses MiB p95",
        "suggest MiB",
        "note",
    )
    for a in advice:
        table.add_row(
            escape(a.step),
            str(a.samples),
            f"{a.asked_cpu:g}",
            "" if a.used_cpu_p95 is None else f"{a.used_cpu_p95:.2f}",
            "" if a.cpu is None else f"{a.cpu:g}",
            str(a.asked_memory_mb),
            "" if a.used_memory_mb_p95 is None else f"{a.used_memory_mb_p95:.0f}",
            "" if a.memory_mb is None else str(a.memory_mb),
            escape(a.note),
        )
    out.print(table)


@app.command()
def cost(
    since: str = typer.Option("7d", help="the period, back from now"),
    runs: int = typer.Option(500, min=1, max=500, help="at most this many runs"),
    url: str | None = URL,
    as_json: bool = AS_JSON,
):
    """Worker-seconds and money per pool (workers' lifetimes) and per pipeline (each attempt's
    share of its worker), at the prices of the pools file (CICD_RAY_POOLS)."""
    from dataclasses import asdict

    from cicd_ray.reads.usage import pipeline_costs, pool_costs

    cutoff = parse_since(since)
    pools = Settings.from_env().pools
    with reported():
        reader = reader_for(url)
        by_pool = pool_costs(reader.workers(cutoff), pools, cutoff, time.time())
        by_pipeline = pipeline_costs(_history(reader, None, cutoff, runs), pools, cutoff)
    if as_json:
        out.print_json(
            data={
                "pools": [asdict(c) for c in by_pool],
                "pipelines": [asdict(c) for c in by_pipeline],
            }
        )
        return
    for title, rows in (("pool", by_pool), ("pipeline", by_pipeline)):
        table = Table(title, "worker-hours", "cost")
        for c in rows:
            table.add_row(escape(c.name), f"{c.worker_seconds / 3600:.3f}", f"{c.money:.2f}")
        out.print(table)


@app.command()
def gc(
    older_than: str | None = typer.Option(
        None,
        help="delete finished runs (with their "
        "logs) and stopped workers older than this, e.g. "
        "7d (default: CICD_RAY_RETENTION_DAYS, 30 days)",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="count what would go; delete nothing"),
    as_json: bool = AS_JSON,
):
    """Delete what is past retention from the store: finished runs with their steps, attempts
    and logs, stopped workers' records, Idempotency-Keys older than a day, source archives
    no queued or running run needs, and artifacts no stored step or reusable result points at.
    The master does this by itself every hour."""
    from cicd_ray.store.blobs import ArtifactStore
    from cicd_ray.store.retention import collect

    settings = Settings.from_env()
    now = time.time()
    cutoff = (
        parse_since(older_than, "--older-than")
        if older_than
        else (now - settings.retention_days * 86400)
    )
    with reported():
        store = open_store(settings.store_url)
        try:
            done = collect(
                store,
                now,
                now - cutoff,
                dry_run=dry_run,
                artifacts=ArtifactStore(settings.artifacts_url),
            )
        finally:
            store.close()
    if as_json:
        out.print_json(data={"dry_run": dry_run, **done.as_dict()})
        return
    verb = "would delete" if dry_run else "deleted"
    out.print(
        f"{verb} {done.runs} run(s) with their logs, {done.sources} source archive(s), "
        f"{done.keys} idempotency key(s), {done.workers} worker record(s), "
        f"{done.artifacts} artifact file(s)"
    )
