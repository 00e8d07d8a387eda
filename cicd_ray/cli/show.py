"""How the command line shows runs: states in colour, times and sizes, a run's steps as a
table, the notes of builds and flow control, the progress of a followed run.
"""

from __future__ import annotations

import time

import typer
from rich.markup import escape
from rich.table import Table

from cicd_ray.cli.connect import Reader, Runner, follow_run
from cicd_ray.cli.root import EXIT_FAILED, EXIT_OK, LOG_TAIL_LINES, err, fail, out
from cicd_ray.protocol import RunView
from cicd_ray.states import RunState, StepState

STATE_STYLE = {
    "queued": "dim",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "timed_out": "red",
    "cancelled": "yellow",
    "skipped": "dim",
    "waiting_approval": "magenta",
}


def styled(state: str) -> str:
    style = STATE_STYLE.get(state, "")
    return f"[{style}]{state}[/{style}]" if style else state


class ProgressPrinter:
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
                state == "queued" and attempts
            ):
                detail = step.reason
            style = STATE_STYLE.get(state, "")
            out.print(
                f"{time.monotonic() - self.t0:7.1f}s  {escape(f'{name:<28}')} "
                f"[{style}]{state:<10}[/{style}] {escape(detail)}"
            )


def print_summary(view: RunView, reader: Reader) -> None:
    run = view.run
    for step in view.steps:
        if step.state not in (StepState.FAILED, StepState.TIMED_OUT) or not step.current_attempt:
            continue
        text = reader.log(run.id, step.name, None, 0).data
        tail = "\n".join(text.decode(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        out.rule(escape(f"{step.name}: {step.state.value} ({step.reason}) - last lines of its log"))
        out.print(tail, markup=False)
    took = (run.finished_at or time.time()) - run.created_at
    counts: dict[str, int] = {}
    for s in view.steps:
        counts[s.state.value] = counts.get(s.state.value, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    out.print(f"run {run.id} {styled(run.state.value)} in {took:.1f}s ({summary})")


def duration(started: float | None, finished: float | None) -> float | None:
    if started is None:
        return None
    return (finished or time.time()) - started


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"


def trigger_of(run) -> str:
    """What started a run, in words: `manual`, `push to main of acme/app`, ..."""
    if run.event == "push":
        return f"a push to {run.branch} of {run.repo}"
    if run.event == "pull_request":
        return f"pull request {run.pr} ({run.branch}) of {run.repo}"
    if run.event == "schedule":
        slot = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.scheduled_for or 0))
        return f"a schedule (its slot of {slot})"
    return "hand (API, CLI or client)"


def steps_table(view: RunView) -> Table:
    last_attempt = {a.step: a for a in view.attempts}
    table = Table(
        "step",
        "state",
        "attempts",
        "wait slot",
        "wait capacity",
        "ran",
        "worker",
        "exit",
        "peak MiB",
        "reason",
    )
    for s in view.steps:
        last = last_attempt.get(s.name)
        peak = last and last.peak_memory_mb
        ran = last and duration(last.started_at, last.finished_at)
        table.add_row(
            escape(s.name),
            styled(s.state.value),
            str(s.attempts),
            human_seconds(last.wait_slot_s) if last else "",
            human_seconds(last.wait_capacity_s) if last else "",
            human_seconds(ran),
            s.worker_id or "",
            "" if s.exit_code is None else str(s.exit_code),
            f"{peak:.0f}" if peak else "",
            escape(s.reason),
        )
    return table


def human_bytes(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def build_notes(view) -> list[str]:
    """What `status` says of a run's builds, a line per fact: reused and carried-over steps,
    artifacts kept, caches restored and saved."""
    last = {a.step: a for a in view.attempts}
    lines = []
    for s in view.steps:
        if s.reused_from:
            o = s.reused_from
            lines.append(f"{s.name}: reused from run {o.run_id} ({o.step}, attempt {o.attempt})")
        elif s.carried_from:
            lines.append(f"{s.name}: carried over from run {s.carried_from.run_id}")
        if s.artifacts:
            lines.append(
                f"{s.name}: {len(s.artifacts)} artifact(s), "
                f"{sum(f.size for f in s.artifacts)} bytes"
            )
        attempt = last.get(s.name)
        for use in attempt.caches if attempt else []:
            said = use.result
            if use.result != "miss":
                where = "this node's copy" if use.from_node else "the store"
                said += f" ({use.restored_from}: {use.bytes_restored} bytes from {where})"
            if use.bytes_saved:
                said += f", saved {use.bytes_saved} bytes"
            lines.append(
                f"{s.name}: cache {use.key} {said}" + (f"; {use.note}" if use.note else "")
            )
    return lines


def _at(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def flow_notes(view: RunView) -> list[str]:
    """A line per approval asked or answered, and per notification of the run's end."""
    lines = []
    for s in view.steps:
        if s.state is StepState.WAITING_APPROVAL:
            lines.append(
                f"{s.name}: waiting for approval since {_at(s.waiting_since)}: "
                f"{s.spec.approval.prompt} (cicd-ray approve {view.run.id} {s.name} "
                "[--reject])"
            )
        elif s.approval is not None:
            a = s.approval
            lines.append(
                f"{s.name}: {a.decision} by {a.by} at {_at(a.at)}"
                + (f": {a.comment}" if a.comment else "")
            )
    for d in view.deliveries:
        what = f"commit status {d.status}" if d.kind == "status" else "notification"
        said = (
            f"{what} to {d.url}: {d.state} after {d.attempts} tr{'y' if d.attempts == 1 else 'ies'}"
        )
        if d.status_code is not None:
            said += f" (HTTP {d.status_code})"
        if d.error and d.state != "delivered":
            said += f"; {d.error}"
        lines.append(said)
    return lines


def follow_to_end(runner: Runner, run_id: str, timeout: float | None) -> None:
    """Follow a run, print its summary, and exit with its outcome."""
    view = watch_run(runner, run_id, timeout)
    print_summary(view, runner)
    raise typer.Exit(EXIT_OK if view.run.state is RunState.SUCCEEDED else EXIT_FAILED)


def watch_run(runner: Runner, run_id: str, timeout: float | None) -> RunView:
    try:
        return follow_run(runner, run_id, ProgressPrinter().update, timeout_s=timeout)
    except TimeoutError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        err.print("interrupted: cancelling the run")
        runner.cancel(run_id)
        return watch_run(runner, run_id, 60)
