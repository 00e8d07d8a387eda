"""Submissions over HTTP against submissions in-process to the master, in one run.

    python bench/http_api.py [--runs 500] [--clients 20]

(Not `http.py`: run as a script, that name would shadow the standard library's `http`.)

Starts a local cluster, the master and the Serve API. Then, twice with the same load (N one-step
runs, `clients` threads each submitting one run after another):

- over HTTP: `POST /api/v1/runs` through httpx, as any CI trigger would;
- in-process: `master.submit` called directly over Ray from the same process (the baseline).

Each step prints the time its process started (`date +%s.%N`), so submit-to-start is measured
from the client's clock before the request to the step's own first instruction, on one machine.
Prints errors (must be 0), p50/p99 submit latency, p50 submit-to-start, and the ratios.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from cicd_ray.api.serve import build
from cicd_ray.cli.connect import RayRunner, follow_run
from cicd_ray.cluster import session
from cicd_ray.config import Settings
from cicd_ray.pools import PoolConfig
from cicd_ray.protocol import SubmitCommand
from cicd_ray.tokens import digest

TOKEN = "bench-token-" + "0" * 20
PIPELINE = (
    "name: bench-http\nsteps:\n  - name: s\n    run: date +%s.%N\n"
    "    resources: {cpu: 1, memory_mb: 0}\n"
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def drive(n: int, clients: int, submit) -> tuple[list[tuple[str, float, float]], int]:
    """Run `submit()` n times from `clients` threads; (run id, t_submit, latency) and errors."""
    results: list[tuple[str, float, float]] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(n))

    def worker() -> None:
        nonlocal errors
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            t0 = time.time()
            try:
                run_id = submit()
            except Exception:  # counted, not raised: the figure is how many failed
                with lock:
                    errors += 1
                continue
            with lock:
                results.append((run_id, t0, time.time() - t0))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def starts(master, results: list[tuple[str, float, float]]) -> list[float]:
    """Submit-to-start of each run, from the timestamp its step printed."""
    out = []
    runner = RayRunner(master, Settings(home=Path(tempfile.gettempdir())))
    for run_id, t0, _ in results:
        follow_run(runner, run_id)
        out.append(float(runner.log(run_id, "s", None, 0).data.decode().strip()) - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args()

    settings = Settings(
        home=Path(tempfile.mkdtemp(prefix="cicd-bench-http-")),
        pools={"default": PoolConfig(name="default", workers=4, cpus=1, memory_mb=0)},
    )
    session.connect(settings=settings, num_cpus=6)
    master = session.ensure_master(settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build([digest(TOKEN)]), name="cicd", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    while httpx.get(f"{url}/healthz").status_code != 200:
        time.sleep(0.2)

    local = threading.local()

    def over_http() -> str:
        if not hasattr(local, "client"):
            local.client = httpx.Client(
                base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
            )
        r = local.client.post("/api/v1/runs", json={"pipeline": PIPELINE})
        r.raise_for_status()
        return r.json()["run_id"]

    def in_process() -> str:
        return ray.get(master.submit.remote(SubmitCommand(pipeline=PIPELINE))).run_id

    drive(args.clients * 2, args.clients, over_http)  # warm up both paths
    drive(args.clients * 2, args.clients, in_process)
    rows = {}
    for name, fn in (("HTTP (Serve)", over_http), ("in-process", in_process)):
        t0 = time.perf_counter()
        results, errors = drive(args.runs, args.clients, fn)
        wall = time.perf_counter() - t0
        latencies = [r[2] for r in results]
        rows[name] = (
            errors,
            pct(latencies, 0.5),
            pct(latencies, 0.99),
            statistics.median(starts(master, results)),
            len(results) / wall,
        )

    print(
        f"cicd-ray HTTP submission benchmark ({args.runs} one-step runs, {args.clients} "
        f"clients, ray {ray.__version__})"
    )
    print(
        f"{'':16}{'errors':>8}{'submit p50':>12}{'submit p99':>12}{'to start p50':>14}{'runs/s':>9}"
    )
    for name, (errors, p50, p99, start, rate) in rows.items():
        print(
            f"{name:16}{errors:>8}{p50 * 1000:>10.1f}ms{p99 * 1000:>10.1f}ms"
            f"{start * 1000:>12.1f}ms{rate:>9.0f}"
        )
    http, base = rows["HTTP (Serve)"], rows["in-process"]
    print(
        f"{'ratio':16}{'':>8}{http[1] / base[1]:>12.2f}{http[2] / base[2]:>12.2f}"
        f"{http[3] / base[3]:>14.2f}"
    )
    serve.shutdown()
    session.shutdown_embedded(master)


if __name__ == "__main__":
    main()
