"""What tests share, in one place: a step task and its execution, the API app called as ASGI
(no Serve, no master), a master core with its inline driver, a scheduler with workers, a git
repository, pipelines of a shape (a long chain) and hostile documents."""

from __future__ import annotations

import asyncio

from cicd_ray import tokens
from cicd_ray.api.application import create_app
from cicd_ray.master.core import MasterCore
from cicd_ray.pipeline.graph import plan
from cicd_ray.pipeline.load import parse_pipeline
from cicd_ray.pipeline.model import MAX_NEED_EDGES, MAX_PLANNED_STEPS, ConcurrencySpec
from cicd_ray.pipeline.yamldoc import MAX_DEPTH
from cicd_ray.pools import PoolConfig
from cicd_ray.protocol import StepOutcome, StepTask, Submitted
from cicd_ray.records import RunRecord, WorkerRecord
from cicd_ray.scheduler.policy import Scheduler
from cicd_ray.states import StepState
from cicd_ray.store.memory import MemoryStore
from cicd_ray.testing.clock import ManualClock
from cicd_ray.testing.inline import InlineDriver
from cicd_ray.worker.config import ExecConfig
from cicd_ray.worker.execution import Execution


def task(run: str, timeout: float = 30, env=None, matrix=None, attempt=1) -> StepTask:
    step = {"name": "s", "run": run, "timeout": timeout, "env": env or {}}
    if matrix:
        step["matrix"] = matrix
    (planned, *_) = plan(parse_pipeline({"name": "p", "steps": [step]}))
    return StepTask(
        run_id="r1", attempt_id=f"r1/{planned.name}/{attempt}", attempt=attempt, step=planned
    )


def execute(tmp_path, t, source=None, **config):
    chunks: list[tuple[int, bytes]] = []
    cfg = ExecConfig(work_dir=tmp_path / "work", **config)
    outcome = Execution(t, cfg, source, lambda seq, data: chunks.append((seq, data))).run()
    log = b"".join(d for _, d in chunks) + outcome.log_tail
    return outcome, log.decode(), chunks


TOKEN = "cicd_test-token"


def call(
    path: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, dict[str, str], bytes, int]:
    """(status, headers, body, body messages the app asked for)."""
    app = create_app(grants=[tokens.Grant(digest=tokens.digest(TOKEN))], max_body_bytes=1024)
    asked = 0
    sent: list[dict] = []

    async def receive():
        nonlocal asked
        asked += 1
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    raw.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": raw,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return (start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, out, asked)


def chain(n: int, reverse: bool = False) -> str:
    """n steps, each needing the one before (or after), the first to run failing."""
    if not reverse:
        steps = ["  - {name: s0, run: 'false'}"] + [
            f"  - {{name: s{i}, run: 'true', needs: [s{i - 1}]}}" for i in range(1, n)
        ]
    else:
        steps = [f"  - {{name: s{i}, run: 'true', needs: [s{i + 1}]}}" for i in range(n - 1)]
        steps.append(f"  - {{name: s{n - 1}, run: 'false'}}")
    return "name: chain\nsteps:\n" + "\n".join(steps) + "\n"


def _laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\n"


def _matrix_bomb() -> str:
    keys = ", ".join(f"k{i}: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" for i in range(10))
    return f"name: m\nsteps:\n  - name: t\n    run: x\n    matrix: {{{keys}}}\n"


def _quadratic_needs(n: int = 19) -> str:
    values = "[" + ", ".join(str(j) for j in range(16)) + "]"
    steps = "".join(
        f"  - name: s{i}\n    run: x\n    matrix: {{a: {values}, b: {values}}}\n"
        f"    needs: [{', '.join(f's{k}' for k in range(i))}]\n"
        for i in range(n)
    )
    return "name: q\nsteps:\n" + steps


def make(settings, store=None, clock=None):
    core = MasterCore(
        settings, store if store is not None else MemoryStore(), clock or ManualClock()
    )
    return core, InlineDriver(core, settings.work_dir)


def submitted(reply) -> str:
    assert isinstance(reply, Submitted), reply
    return reply.run_id


def make_repo(tmp_path):
    """A bare repository with one commit on `main` and a tag, as a CI server would serve."""
    import subprocess

    work = tmp_path / "work"
    work.mkdir()
    run = lambda *a: subprocess.run(a, cwd=work, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q", "-b", "main")
    (work / "README").write_text("version one\n")
    run("git", "add", "README")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    run("git", "tag", "v1")
    (work / "README").write_text("version two\n")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "two")
    bare = tmp_path / "repo.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    return f"file://{bare}"


def make_scheduler(pools=None, workers=(("w1", 2.0), ("w2", 2.0)), timeout_s=10.0):
    pools = pools or {"default": PoolConfig(name="default", workers=len(workers), cpus=2)}
    s = Scheduler(pools, heartbeat_timeout_s=timeout_s)
    s.tick(0.0)
    started = s.take().start_workers
    # Register the workers the scheduler asked for, under the test's own names.
    for rec, (name, cpus) in zip(started, workers, strict=True):
        del s.workers[rec.id]
        s.register_worker(
            WorkerRecord(id=name, pool=rec.pool, cpus=cpus, memory_mb=4096, started_at=0.0), 0.0
        )
    s.take()
    return s


def submit_to(
    s,
    steps,
    run_id="r1",
    now=0.0,
    seq=0,
    branch="main",
    concurrency=None,
    project="default",
    **extra,
):
    """Submit a run of these steps (a pipeline named p) to a bare scheduler; the run."""
    spec = parse_pipeline({"name": "p", "steps": steps, **extra})
    run = RunRecord(
        id=run_id,
        pipeline="p",
        created_at=now,
        seq=seq,
        branch=branch,
        concurrency=ConcurrencySpec(**concurrency) if concurrency else None,
        project=project,
    )
    s.submit(run, plan(spec), now)
    return run


def dispatched(s, now):
    s.tick(now)
    d = s.take()
    return [(w, t.step.name) for w, t in d.dispatch], d


def finish(s, step, state=StepState.SUCCEEDED, run_id="r1", now=1.0, code=0):
    attempt = s.steps[run_id][step].current_attempt
    return s.on_outcome(
        StepOutcome(attempt_id=attempt, run_id=run_id, step=step, state=state, exit_code=code), now
    )


HOSTILE = {
    "matrix of 10 keys x 10 values": (_matrix_bomb(), "more than the 256 allowed"),
    "quadratic needs": (_quadratic_needs(), f"more than the {MAX_NEED_EDGES} allowed"),
    "too many steps": (
        "name: w\nsteps:\n"
        + "".join(
            f"  - {{name: s{i}, run: x, matrix: {{k: [a, b]}}}}\n"
            for i in range(MAX_PLANNED_STEPS // 2 + 1)
        ),
        f"more than the {MAX_PLANNED_STEPS} allowed",
    ),
    "billion laughs": (_laughs(), "anchors and aliases"),
    "recursive alias": ("name: &x [*x]\n", "anchors and aliases"),
    "deep flow nesting": ("name: x\nsteps: " + "[" * 5000 + "]" * 5000 + "\n", "nest"),
    "deep block nesting": (
        "name: x\nsteps:\n" + "".join(" " * (2 * i) + f"- k{i}:\n" for i in range(1, 60)),
        f"more than {MAX_DEPTH} levels",
    ),
    "cyclic chain": (
        chain(3000).replace("run: 'false'}", "run: x, needs: [s2999]}", 1),
        "the needs form a cycle",
    ),
    "64 MiB": ("name: x\nsteps: []\n#" + "x" * (64 * 2**20), "byte limit for a pipeline"),
}
