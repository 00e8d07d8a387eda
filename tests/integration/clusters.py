"""Clusters for the tests and benchmarks, in processes of their own on this one machine.

`HaCluster` is shaped like a highly available deployment: a head with GCS fault tolerance on
Redis (`cicd-ray up --ha`, no CPUs) and worker nodes (`ray start --address`) that carry the
master and the workers. The test process is not a
Ray driver of it: it speaks HTTP to the API, reads the Redis store, and kills processes.

Each worker node gets its own --temp-dir, so the processes of every node can be told apart:
a node is everything whose command line names its folder, and their descendants.

`LocalAutoscaling` is `cicd-ray up --local-autoscaling`: nodes come and go with the queue.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.waiting import wait_until

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
MASTER_RESOURCE = "cicd-control"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(folder: Path) -> tuple[str, subprocess.Popen]:
    """A real redis-server (Debian's; `.ci/run` and `./dev test` install it) on a free port,
    with AOF on, answering PING. Returns its URL and process."""
    import redis

    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: run ./dev test (it installs it) or apt-get"
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--appendonly",
            "yes",
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    deadline = time.monotonic() + 20
    while True:
        try:
            if client.ping():
                break
        except redis.RedisError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(
                f"redis-server on port {port} did not answer PING (exit code {proc.poll()})"
            )
        time.sleep(0.05)
    client.close()
    return url, proc


class S3Server:
    """moto's S3-compatible server in a process of its own on a free port, with one bucket:
    `env` is what a process needs to use it (the standard AWS variables), `url` the artifact
    store URL (CICD_RAY_ARTIFACTS)."""

    BUCKET = "cicd-artifacts"

    def __init__(self) -> None:
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.url = f"s3://{self.BUCKET}/ci"
        self.env = {
            "AWS_ACCESS_KEY_ID": "test-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers() -> bool:
            assert self.proc.poll() is None, f"moto_server exited ({self.proc.returncode})"
            try:
                return httpx.get(self.endpoint, timeout=1).status_code < 500
            except httpx.HTTPError:
                return False

        wait_until(answers, timeout_s=30)
        self.client().create_bucket(Bucket=self.BUCKET)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def object_keys(self) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.BUCKET)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def cluster_env(tmp: Path, token: str, **extra: str) -> dict[str, str]:
    """The environment of a cluster's processes: none of the test process's own Ray or
    cicd-ray settings but the session's Ray folder (tests/conftest.py), this venv's commands
    first, a home under `tmp`, the API token."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "CICD_RAY_")) or k == "RAY_TMPDIR"
    }
    env.update(
        PATH=f"{BIN}:{env['PATH']}",
        RAY_USAGE_STATS_ENABLED="0",
        CICD_RAY_HOME=str(tmp / "home"),
        CICD_RAY_TOKENS=token,
        CICD_RAY_HEARTBEAT_INTERVAL_S="0.5",
        **extra,
    )
    return env


def api_client(url: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"})


def _tree(roots: list[psutil.Process]) -> set[psutil.Process]:
    found = set()
    for proc in roots:
        with contextlib.suppress(psutil.Error):
            found |= {proc, *proc.children(recursive=True)}
    return found


def _kill(procs: set[psutil.Process]) -> int:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(list(procs), timeout=10)
    return len(procs)


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


class Node:
    """A worker node: one raylet (and its workers and agents) with its own temp folder."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir

    def processes(self) -> set[psutil.Process]:
        mark = f"{self.temp_dir}/"
        return _tree([p for p in psutil.process_iter() if mark in cmdline(p)])

    def actor_pids(self, title: str) -> list[int]:
        """Actor processes on this node by their title, e.g. "ray::Master"."""
        return [p.pid for p in self.processes() if cmdline(p).startswith(title)]

    def kill(self) -> int:
        return _kill(self.processes())


class HaCluster:
    def __init__(self, tmp: Path, redis_url: str, **extra_env: str) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        host_port = redis_url.split("://", 1)[1].rsplit("/", 1)[0]
        self.gcs_redis = f"redis://{host_port}"
        self.store_url = f"redis://{host_port}/1"
        self.ray_port = free_port()
        self.api_port = free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.token = "ha-token-" + "y" * 20
        self.namespace = f"cicd-test-{self.ray_port}"  # the GCS's key prefix in Redis
        self.nodes: list[Node] = []
        self._added = 0
        self._gcs_command: tuple[list[str], dict[str, str]] | None = None
        pools = tmp / "pools.yaml"
        pools.write_text("pools:\n  - {name: default, workers: 3, cpus: 1, memory_mb: 256}\n")

        self.env = cluster_env(
            tmp,
            self.token,
            RAY_AUTH_MODE="disabled",
            CICD_RAY_STORE=self.store_url,
            CICD_RAY_POOLS=str(pools),
            CICD_RAY_MASTER_RESOURCES=json.dumps({MASTER_RESOURCE: 0.01}),
            CICD_RAY_HEARTBEAT_TIMEOUT_S="6",
            CICD_RAY_KILL_GRACE_S="1",
            # Raylets wait this long for a GCS that went away: more than a head restart.
            RAY_gcs_rpc_server_reconnect_timeout_s="120",
            **extra_env,
        )
        self.http = api_client(self.url, self.token)

    # --- starting ------------------------------------------------------------------------------

    def _up_command(self) -> list[str]:
        """`cicd-ray up --ha` as a head pod's command would run it: first start, or after the
        head died (it then replaces the head on the same address)."""
        return [
            str(BIN / "cicd-ray"),
            "up",
            "--ha",
            self.gcs_redis,
            "--ha-namespace",
            self.namespace,
            "--head-cpus",
            "0",
            "--port",
            str(self.api_port),
            "--ray-port",
            str(self.ray_port),
            "--proxy-location",
            "HeadOnly",
        ]

    def up(self, timeout_s: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            self._up_command(),
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def start(self, nodes: int = 2, cpus: int = 2) -> None:
        """The head via `up` in the background (it waits for a node to place the master on),
        then the worker nodes."""
        started = subprocess.Popen(
            self._up_command(),
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._wait_port(self.ray_port, 120, started)
        for _ in range(nodes):
            self.add_node(cpus)
        out, _ = started.communicate(timeout=240)
        assert started.returncode == 0, out
        self.wait_healthy()

    def add_node(self, cpus: int = 2) -> Node:
        self._added += 1
        node = Node(self.tmp / f"node{self._added}")
        node.temp_dir.mkdir(parents=True)
        cmd = [
            str(BIN / "ray"),
            "start",
            f"--address=127.0.0.1:{self.ray_port}",
            f"--num-cpus={cpus}",
            f"--temp-dir={node.temp_dir}",
            "--disable-usage-stats",
            f"--resources={json.dumps({MASTER_RESOURCE: 1})}",
            f"--dashboard-agent-listen-port={free_port()}",
        ]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        self.nodes.append(node)
        return node

    def _wait_port(self, port: int, timeout_s: float, proc: subprocess.Popen | None = None):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if proc is not None and proc.poll() is not None:
                raise AssertionError(proc.stdout.read())
            time.sleep(0.2)
        raise AssertionError(f"nothing listens on {port} after {timeout_s} s")

    def wait_healthy(self, timeout_s: float = 120) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/healthz", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            time.sleep(0.2)
        raise AssertionError(f"the API at {self.url} is not healthy after {timeout_s} s")

    # --- the head and its GCS ------------------------------------------------------------------

    def gcs_process(self) -> psutil.Process | None:
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == self.ray_port and conn.pid:
                return psutil.Process(conn.pid)
        return None

    def kill_gcs(self) -> None:
        """SIGKILL the GCS server, keeping its command line and environment to restart it
        with (what `ray start` gave it: the port, the session, the Redis)."""
        gcs = self.gcs_process()
        assert gcs is not None and "gcs_server" in cmdline(gcs)
        self._gcs_command = (gcs.cmdline(), gcs.environ())
        gcs.kill()
        gcs.wait(10)

    def restart_gcs(self) -> None:
        argv, env = self._gcs_command
        subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_port(self.ray_port, 60)

    def head_processes(self) -> set[psutil.Process]:
        """The head: the GCS, the processes naming its session folder or its port, not those
        of a worker node (which name their own folder), and their descendants."""
        gcs = self.gcs_process()
        assert gcs is not None
        session = re.search(r"--session-dir=(\S+)", cmdline(gcs)).group(1)
        nodes = [f"{n.temp_dir}/" for n in self.nodes]
        roots = [gcs]
        for proc in psutil.process_iter():
            line = cmdline(proc)
            if "ray" not in line or any(n in line for n in nodes):
                continue
            if session in line or f":{self.ray_port}" in line:
                roots.append(proc)
        return _tree(roots)

    def kill_head(self) -> int:
        return _kill(self.head_processes())

    # --- the cluster's actors, through their processes ------------------------------------------

    def actor_pids(self, title: str) -> list[int]:
        return [pid for node in self.nodes for pid in node.actor_pids(title)]

    def wait_for_process(self, text: str, timeout_s: float = 30) -> int:
        """The pid of a process on a worker node whose command line contains `text`."""
        found: list[int] = []

        def look() -> bool:
            found[:] = [p.pid for n in self.nodes for p in n.processes() if text in cmdline(p)]
            return bool(found)

        self.wait_for(look, timeout_s)
        return found[0]

    @staticmethod
    def wait_for(check, timeout_s: float = 60) -> None:
        wait_until(check, timeout_s)

    def node_of(self, pid: int) -> Node:
        return next(n for n in self.nodes if pid in {p.pid for p in n.processes()})

    def stop(self) -> None:
        self.http.close()
        procs = set()
        with contextlib.suppress(AssertionError, AttributeError):
            procs |= self.head_processes()
        for node in self.nodes:
            procs |= node.processes()
        _kill(procs)

    # --- runs, as a user sees them ---------------------------------------------------------------

    def submit(self, pipeline: dict, retries_s: float = 60) -> str:
        deadline = time.monotonic() + retries_s
        while True:
            try:
                key = hashlib.sha256(json.dumps(pipeline, sort_keys=True).encode()).hexdigest()
                r = self.http.post(
                    "/api/v1/runs", json={"pipeline": pipeline}, headers={"Idempotency-Key": key}
                )
                if r.status_code in (200, 201):
                    return r.json()["run_id"]
            except httpx.TransportError as e:
                r = e
            if time.monotonic() > deadline:
                raise AssertionError(f"submit failed: {r!r}")
            time.sleep(0.5)

    def view(self, run_id: str) -> dict | None:
        try:
            r = self.http.get(f"/api/v1/runs/{run_id}", timeout=10)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def wait(self, run_id: str, timeout_s: float = 180) -> dict:
        deadline = time.monotonic() + timeout_s
        view = None
        while time.monotonic() < deadline:
            view = self.view(run_id) or view
            if view and view["run"]["state"] in ("succeeded", "failed", "cancelled"):
                return view
            time.sleep(0.3)
        raise AssertionError(f"run {run_id} did not end: {json.dumps(view)[:2000]}")

    def wait_step(self, run_id: str, step: str, state: str, timeout_s: float = 90) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            view = self.view(run_id)
            if view:
                found = next(s for s in view["steps"] if s["spec"]["name"] == step)
                if found["state"] == state:
                    return found
            time.sleep(0.1)
        raise AssertionError(f"step {step} of {run_id} never reached {state}")

    def log(self, run_id: str, step: str) -> str:
        return self.http.get(f"/api/v1/runs/{run_id}/steps/{step}/log").text


class LocalAutoscaling:
    """`cicd-ray up --local-autoscaling` in its own processes, spoken to over HTTP."""

    def __init__(self, tmp: Path, pools: str, **env: str) -> None:
        self.pools = tmp / "pools.yaml"
        self.pools.write_text(pools)
        self.port, self.ray_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = "scale-token-" + "z" * 20
        self.env = cluster_env(tmp, self.token, **env)
        self.http = api_client(self.url, self.token)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "cicd-ray"), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def up(self, node_idle_timeout_s: float = 5) -> None:
        started = self.cli(
            "up",
            "--local-autoscaling",
            str(self.pools),
            "--node-idle-timeout",
            str(node_idle_timeout_s),
            "--port",
            str(self.port),
            "--ray-port",
            str(self.ray_port),
            "--proxy-location",
            "HeadOnly",
        )
        assert started.returncode == 0, started.stdout + started.stderr

    def down(self) -> None:
        self.http.close()
        stopped = self.cli("down")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr

    def raylets(self) -> int:
        """Raylets of this cluster: the head's and one per node the autoscaler added."""
        mark = f":{self.ray_port}"
        return sum(
            1
            for p in psutil.process_iter(["cmdline"])
            if "raylet" in (p.info["cmdline"] or [""])[0]
            and any(mark in part for part in p.info["cmdline"])
        )

    def live_workers(self) -> list[dict]:
        workers = self.http.get("/api/v1/workers").json()["workers"]
        return [w for w in workers if w["state"] in ("starting", "ready")]
