"""`cicd-ray up` and `down`: a long-running cluster with the master and the HTTP API.

`up` starts a local Ray head (or joins `--address`), makes sure the master runs, deploys the
Serve application, and returns, leaving everything running. What it started is written to
`$CICD_RAY_HOME/up.json`, so `down` stops exactly that.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import ray
import yaml
from ray import serve
from ray._common.utils import get_ray_address_file

from cicd_ray import tokens
from cicd_ray.cluster.local import autoscaler_config
from cicd_ray.cluster.session import ensure_master
from cicd_ray.config import Ha, Settings
from cicd_ray.errors import CicdError
from cicd_ray.names import MASTER_NAME, NAMESPACE, worker_actor_name
from cicd_ray.ownership import private_folder
from cicd_ray.pools import load_pools

SERVE_APP = "cicd"
# Ray Serve's own names for its controller actor (ray.serve._private.constants).
SERVE_CONTROLLER = "SERVE_CONTROLLER_ACTOR"
SERVE_NAMESPACE = "serve"
READY_TIMEOUT_S = 120.0
PROXY_LOCATIONS = ("EveryNode", "HeadOnly", "Disabled")  # Serve's ProxyLocation values


@dataclass
class Up:
    api_url: str
    dashboard_url: str
    address: str
    token: str | None  # set only when `up` created it: shown once, never stored
    started_head: bool
    replaced_head: bool = False
    reused_head: bool = False  # an earlier `up` started the head this one found running


def _state_file(settings: Settings) -> Path:
    return settings.home / "up.json"


def _tokens_file(settings: Settings) -> Path:
    return settings.home / "tokens"


def _ray_cli() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _start_head(
    cpus: int,
    dashboard_host: str,
    port: int | None = None,
    ha: Ha | None = None,
    autoscaling: Path | None = None,
    dashboard_port: int | None = None,
) -> str:
    """Start a local Ray head; it becomes the machine's current cluster ("auto")."""
    # The dashboard agent's HTTP port (52365 by default) is held by any other Ray instance on
    # this machine, and without its agent a head takes no job submissions: pick a free one.
    cmd = [
        _ray_cli(),
        "start",
        "--head",
        f"--num-cpus={cpus}",
        f"--dashboard-host={dashboard_host}",
        "--disable-usage-stats",
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    if dashboard_port is not None:
        cmd.append(f"--dashboard-port={dashboard_port}")
    if port is not None:
        cmd.append(f"--port={port}")
        _forget_current_cluster(port)  # a dead head's note would stop `ray start` here
    env = dict(os.environ)
    if autoscaling is not None:
        # Ray's fake multi-node provider: nodes are raylets on this machine.
        cmd.append(f"--autoscaling-config={autoscaling}")
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    if ha is not None:
        env.update(ha.env())
        if ha.password:
            cmd += ["--redis-username=default", f"--redis-password={ha.password}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise CicdError(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()[-2000:]}")
    return "auto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(address: str, own_head: bool):
    # The head `up` started is this machine's current cluster: "auto" finds it and its
    # token-authentication mode, which an explicit address would need RAY_AUTH_MODE=token for.
    return ray.init(
        address="auto" if own_head else address, namespace=NAMESPACE, log_to_driver=False
    )


def _tokens(settings: Settings) -> tuple[list[tokens.Grant], Path | None, str | None]:
    """The configured grants and tokens file; with neither, the file `up` keeps in
    $CICD_RAY_HOME/tokens, made with a new admin token the first time (the token itself is
    returned to be shown once). The replicas read the file again when it changes, so tokens
    `cicd-ray token create` adds to it work at once."""
    if settings.token_grants or settings.tokens_file:
        return settings.token_grants, settings.tokens_file, None
    path = _tokens_file(settings)
    if path.exists():
        return [], path, None
    token, _ = tokens.add_token(path, tokens.Role.ADMIN, None)
    return [], path, token


def up(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    ha: Ha | None = None,
    head_cpus: int | None = None,
    proxy_location: str = "EveryNode",
    ray_port: int | None = None,
    local_autoscaling: Path | None = None,
    node_idle_timeout_s: float = 60.0,
    dashboard_port: int | None = None,
) -> Up:
    """Start or join the cluster, make sure the master runs, deploy the API.

    With `ha`, the head keeps the GCS's tables in Redis; `up` again with the same options after
    the head died starts a new head on the same address, and the cluster, the master and the
    runs carry on (what KubeRay does when it restarts a head pod). With `local_autoscaling` (a
    pools file), the head has no CPUs and Ray's autoscaler adds a local node per worker the
    pools need, and removes it `node_idle_timeout_s` after its worker is retired."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if proxy_location not in PROXY_LOCATIONS:
        raise CicdError(
            f"--proxy-location {proxy_location!r}: expected one of {', '.join(PROXY_LOCATIONS)}"
        )
    if local_autoscaling is not None:
        settings = settings.model_copy(
            update={"pools": load_pools(local_autoscaling), "reserve_memory": False}
        )
    if head_cpus is None:
        wanted = sum(p.max_workers * p.cpus for p in settings.pools.values())
        head_cpus = max(os.cpu_count() or 1, int(wanted) + 1)
    head = {"dashboard_host": host, "ha": ha, "dashboard_port": dashboard_port}
    address, started_head, replaced, reused = (
        (address, False, False, False)
        if address
        else _own_head(settings, head_cpus, head, ray_port, local_autoscaling, node_idle_timeout_s)
    )
    context = _join(address, started_head)
    gcs = ray.get_runtime_context().gcs_address
    dashboard = context.dashboard_url or ""
    ensure_master(settings)
    api_url, token = _deploy_api(settings, host, port, proxy_location)
    state = {"address": gcs, "started_head": started_head, "api_url": api_url}
    _state_file(settings).write_text(json.dumps(state))
    ray.shutdown()
    return Up(
        api_url=api_url,
        dashboard_url=f"http://{dashboard}" if dashboard else "",
        address=gcs,
        token=token,
        started_head=started_head,
        replaced_head=replaced,
        reused_head=reused,
    )


def _deploy_api(settings: Settings, host: str, port: int, proxy_location: str) -> tuple[str, str]:
    """The API on Serve, answering /healthz: its URL, and the token made for it (if one was)."""
    from cicd_ray.api.serve import build

    grants, tokens_file, token = _tokens(settings)
    _check_serve_port(host, port)
    serve.start(http_options={"host": host, "port": port}, proxy_location=proxy_location)
    serve.run(
        build(grants, tokens_file, settings=settings),
        name=SERVE_APP,
        route_prefix="/",
        blocking=False,
    )
    api_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    _wait_healthy(api_url)
    return api_url, token


def _own_head(
    settings: Settings,
    head_cpus: int,
    head: dict,
    ray_port: int | None,
    local_autoscaling: Path | None,
    node_idle_timeout_s: float,
) -> tuple[str, bool, bool, bool]:
    """(address, started_head, replaced, reused) of the head `up` starts or finds again: the
    one an earlier `up` started, if alive; with HA, a new one on its address; with local
    autoscaling, one with no CPUs and Ray's autoscaler; else a new one."""
    previous = _read_state(settings)
    if previous.get("started_head") and _alive(previous["address"]):
        return previous["address"], True, False, True  # `up` again
    if previous.get("started_head") and head["ha"] is not None:
        gcs_port = int(previous["address"].rpartition(":")[2])
        return _start_head(head_cpus, port=gcs_port, **head), True, True, False
    if local_autoscaling is not None:
        ray_port = ray_port or _free_port()
        config = settings.home / "autoscaler.yaml"
        private_folder(config.parent)
        config.write_text(
            yaml.safe_dump(
                autoscaler_config(
                    settings.pools,
                    f"{ray.util.get_node_ip_address()}:{ray_port}",
                    node_idle_timeout_s,
                )
            )
        )
        return _start_head(0, port=ray_port, autoscaling=config, **head), True, False, False
    return _start_head(head_cpus, port=ray_port, **head), True, False, False


def _check_serve_port(host: str, port: int) -> None:
    """Serve keeps the HTTP options it was first started with: say so instead of answering
    with a URL nothing listens on."""
    try:
        controller = ray.get_actor(SERVE_CONTROLLER, namespace=SERVE_NAMESPACE)
    except ValueError:
        return  # Serve is not running yet
    running = ray.get(controller.get_http_config.remote(), timeout=30)
    if (running.host, running.port) != (host, port):
        raise CicdError(
            f"Ray Serve already runs on this cluster on {running.host}:"
            f"{running.port}; use --host {running.host} --port {running.port}, "
            "or `cicd-ray down` first"
        )


def _stop_head(gcs_port: int) -> None:
    """Stop the local head `up` started, and only it: `ray stop` would stop every Ray cluster
    on the machine. Its processes carry its session folder in their command lines; the GCS
    server's is found by the port it listens on."""
    gcs = next(
        (
            c.pid
            for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == gcs_port and c.pid
        ),
        None,
    )
    if gcs is None:
        return
    found = re.search(r"(/\S*/session_[^/\s]+)", " ".join(psutil.Process(gcs).cmdline()))
    marks = [found.group(1)] if found else []
    marks.append(f":{gcs_port}")  # the client server names the head's address only
    # Not this process nor its callers: `cicd-ray down --address HOST:PORT` names the port too.
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if proc.pid in spared:
            continue
        if proc.pid == gcs or ("ray" in line and any(m in line for m in marks)):
            roots.append(proc)
    tree = set()
    for proc in roots:
        with contextlib.suppress(psutil.Error):
            tree |= {proc, *proc.children(recursive=True)}
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(tree), timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _forget_current_cluster(gcs_port)


def _forget_current_cluster(gcs_port: int) -> None:
    """Remove Ray's note of "the cluster on this machine" when it names this port: `ray.init()`
    would try to join it, and `ray start --head` on the port refuses while it is there."""
    # Where Ray keeps it: under $RAY_TMPDIR (else $TMPDIR, else /tmp), in ray/.
    current = Path(get_ray_address_file(None))
    with contextlib.suppress(OSError):
        if current.read_text().strip().endswith(f":{gcs_port}"):
            current.unlink()


def _read_state(settings: Settings) -> dict:
    path = _state_file(settings)
    return json.loads(path.read_text()) if path.exists() else {}


def _alive(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) == 0


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=3)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.3)
    raise CicdError(f"the API at {url} did not become healthy: {last}")


def down(settings: Settings, address: str | None = None) -> list[str]:
    """Stop what `up` started: the API, the master and its workers, and the head if `up`
    started it. Returns what was stopped."""
    path = _state_file(settings)
    state = _read_state(settings)
    address = address or os.environ.get("RAY_ADDRESS") or state.get("address")
    if not address:
        raise CicdError(f"nothing to stop: no {path} from `cicd-ray up`, and no --address")
    own_head = bool(state.get("started_head")) and address == state.get("address")
    stopped = []
    try:
        _join(address, own_head)
    except ConnectionError as e:
        raise CicdError(f"cannot reach the cluster at {address}: {e}") from None
    serve.shutdown()
    stopped.append("the HTTP API")
    try:
        master = ray.get_actor(MASTER_NAME, namespace=NAMESPACE)
        workers = ray.get(master.workers.remote(), timeout=30)
        for w in workers:
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(worker_actor_name(w["id"]), namespace=NAMESPACE))
        ray.kill(master, no_restart=True)
        stopped.append("the master and its workers")
    except ValueError:
        pass
    ray.shutdown()
    if own_head:
        _stop_head(int(address.rpartition(":")[2]))
        stopped.append("the Ray head started by `cicd-ray up`")
    path.unlink(missing_ok=True)
    return stopped
