"""`cicd-ray up` and `down`: a long-running cluster with the master and the HTTP API.

`up` starts a local Ray head (or joins `--address`), makes sure the master runs, deploys the
Serve application, and returns, leaving everything running. What it started is written to
`$CICD_RAY_HOME/up.json`, so `down` stops exactly that.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import ray
from ray import serve

from cicd_ray import auth
from cicd_ray.cluster import ensure_master
from cicd_ray.config import Settings
from cicd_ray.errors import CicdError
from cicd_ray.worker import MASTER_NAME, NAMESPACE, worker_actor_name

SERVE_APP = "cicd"
# Ray Serve's own names for its controller actor (ray.serve._private.constants).
SERVE_CONTROLLER = "SERVE_CONTROLLER_ACTOR"
SERVE_NAMESPACE = "serve"
READY_TIMEOUT_S = 120.0


@dataclass
class Up:
    api_url: str
    dashboard_url: str
    address: str
    token: str | None  # set only when `up` created it: shown once, never stored
    started_head: bool


def _state_file(settings: Settings) -> Path:
    return settings.home / "up.json"


def _tokens_file(settings: Settings) -> Path:
    return settings.home / "tokens"


def _ray_cli() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _start_head(cpus: int, dashboard_host: str) -> None:
    cmd = [_ray_cli(), "start", "--head", f"--num-cpus={cpus}",
           f"--dashboard-host={dashboard_host}", "--disable-usage-stats"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise CicdError(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()[-2000:]}")


def _digests(settings: Settings) -> tuple[list[str], str | None]:
    """The configured token digests; with none configured, a new token whose digest is kept in
    $CICD_RAY_HOME/tokens (the token itself is returned to be shown once)."""
    digests = auth.configured_digests()
    if digests:
        return digests, None
    path = _tokens_file(settings)
    if path.exists():
        return auth.configured_digests({"CICD_RAY_TOKENS_FILE": str(path)}), None
    token = auth.new_token()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# digests of the API tokens created by `cicd-ray up`\n"
                    f"{auth.digest(token)}\n")
    path.chmod(0o600)
    return [auth.digest(token)], token


def up(settings: Settings, host: str = "127.0.0.1", port: int = 8000,
       address: str | None = None) -> Up:
    address = address or os.environ.get("RAY_ADDRESS") or None
    started_head = False
    if address is None:
        try:
            context = ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False)
        except ConnectionError:
            wanted = sum(p.workers * p.cpus for p in settings.pools.values())
            _start_head(max(os.cpu_count() or 1, int(wanted) + 1), host)
            started_head = True
            context = ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False)
    else:
        context = ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    gcs = ray.get_runtime_context().gcs_address
    dashboard = context.dashboard_url or ""
    ensure_master(settings)
    digests, token = _digests(settings)
    from cicd_ray.api import build

    _check_serve_port(host, port)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(digests), name=SERVE_APP, route_prefix="/", blocking=False)
    api_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    _wait_healthy(api_url)
    state = {"address": gcs, "started_head": started_head, "api_url": api_url}
    _state_file(settings).write_text(json.dumps(state))
    ray.shutdown()
    return Up(api_url=api_url, dashboard_url=f"http://{dashboard}" if dashboard else "",
              address=gcs, token=token, started_head=started_head)


def _check_serve_port(host: str, port: int) -> None:
    """Serve keeps the HTTP options it was first started with: say so instead of answering
    with a URL nothing listens on."""
    try:
        controller = ray.get_actor(SERVE_CONTROLLER, namespace=SERVE_NAMESPACE)
    except ValueError:
        return  # Serve is not running yet
    running = ray.get(controller.get_http_config.remote(), timeout=30)
    if (running.host, running.port) != (host, port):
        raise CicdError(f"Ray Serve already runs on this cluster on {running.host}:"
                        f"{running.port}; use --host {running.host} --port {running.port}, "
                        "or `cicd-ray down` first")


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
    state = json.loads(path.read_text()) if path.exists() else {}
    address = address or os.environ.get("RAY_ADDRESS") or state.get("address")
    if not address:
        raise CicdError(f"nothing to stop: no {path} from `cicd-ray up`, and no --address")
    stopped = []
    # The head `up` started is this machine's current cluster; "auto" also picks up its
    # token-authentication mode, which an explicit address would need RAY_AUTH_MODE=token for.
    target = "auto" if state.get("started_head") and address == state.get("address") else address
    try:
        ray.init(address=target, namespace=NAMESPACE, log_to_driver=False)
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
    if state.get("started_head"):
        subprocess.run([_ray_cli(), "stop"], capture_output=True, text=True)
        stopped.append("the Ray head started by `cicd-ray up`")
    path.unlink(missing_ok=True)
    return stopped
