"""One local Ray cluster and one master for the whole integration session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from cicd_ray.cli.connect import RayRunner, follow_run
from cicd_ray.cluster import session
from cicd_ray.config import Settings
from cicd_ray.pipeline.load import parse_pipeline
from cicd_ray.pools import PoolConfig, ProjectConfig
from cicd_ray.states import StepState
from cicd_ray.triggers.repositories import load_repos


class Harness:
    def __init__(self, master, settings: Settings, tmp: Path) -> None:
        self.master = master
        self.settings = settings
        self.tmp = tmp

    def submit(self, doc: dict, source: Path | None = None, env: dict | None = None) -> str:
        return session.submit(
            self.master, parse_pipeline(doc), self.tmp, source, env, self.settings
        )

    def wait(self, run_id: str, timeout_s: float = 90) -> dict:
        """The final view, as the CLI follows a run (the master's long poll), as JSON."""
        runner = RayRunner(self.master, self.settings)
        return follow_run(runner, run_id, timeout_s=timeout_s).model_dump(mode="json")

    def run(self, doc: dict, **kw) -> dict:
        return self.wait(self.submit(doc, **kw))

    def view(self, run_id: str) -> dict:
        return ray.get(self.master.get_run.remote(run_id)).model_dump(mode="json")

    def master_workers(self) -> list[dict]:
        return ray.get(self.master.workers.remote())

    def step(self, view: dict, name: str) -> dict:
        return next(s for s in view["steps"] if s["spec"]["name"] == name)

    def log(self, run_id: str, step: str, attempt: int | None = None) -> str:
        view = self.view(run_id)
        attempts = [a for a in view["attempts"] if a["step"] == step]
        chosen = attempts[-1] if attempt is None else attempts[attempt - 1]
        return ray.get(self.master.read_log.remote(chosen["id"])).decode()

    def steady(self, timeout_s: float = 60) -> list[dict]:
        """The ready workers once every pool has exactly its size of them ready: after a
        fault test killed or froze some, the pools are whole again before the next test."""
        wanted = sorted(p.name for p in self.settings.pools.values() for _ in range(p.min_workers))
        deadline = time.monotonic() + timeout_s
        while True:
            ready = [w for w in self.master_workers() if w["state"] == "ready"]
            if sorted(w["pool"] for w in ready) == wanted:
                return ready
            if time.monotonic() > deadline:
                raise AssertionError(f"pools not whole after {timeout_s} s: {ready}")
            time.sleep(0.1)

    def wait_for_step(
        self, run_id: str, name: str, state: StepState, timeout_s: float = 60
    ) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            step = self.step(self.view(run_id), name)
            if step["state"] == state.value:
                return step
            time.sleep(0.05)
        raise AssertionError(f"step {name} never reached {state.value}")


# In the environment of every process of the session's cluster (the raylet and the workers
# inherit it from this process): a step must not be able to find it (test_security).
WORKER_SECRET = "worker-secret-" + "z" * 16


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    os.environ["CICD_TEST_WORKER_SECRET"] = WORKER_SECRET
    home = tmp_path_factory.mktemp("cicd-home")
    secrets = tmp_path_factory.mktemp("secrets")  # 0700, root's: the workers read it
    (secrets / "default").mkdir()
    (secrets / "default" / "DEPLOY_KEY").write_text(DEPLOY_KEY + "\n")
    (secrets / "web").mkdir()
    (secrets / "web" / "DEPLOY_KEY").write_text(WEB_DEPLOY_KEY + "\n")
    (secrets / "web" / "HOOK_SECRET").write_text(HOOK_SECRET)
    (secrets / "web" / "STATUS_TOKEN").write_text(STATUS_TOKEN)
    git_host = GitHost(tmp_path_factory.mktemp("git"))
    settings = Settings(
        home=home,
        pools={
            "default": PoolConfig(name="default", workers=2, cpus=2, memory_mb=1024),
            "solo": PoolConfig(name="solo", workers=1, cpus=1, memory_mb=512, slots=1),
        },
        heartbeat_interval_s=0.5,
        heartbeat_timeout_s=5,
        kill_grace_s=1,
        schedule_min_interval_s=1,  # test_schedules fires every 5 s
        git_allow=["file"],  # the tests' repositories are local ones
        webhook_secret=WEBHOOK_SECRET,
        webhook_allow=["127.0.0.1"],  # the tests' receivers
        secrets_dir=secrets,
        projects={"capped": ProjectConfig(name="capped", max_queued_runs=1)},
        repos=load_repos(git_host.repos_file),
        repos_file=git_host.repos_file,
    )
    session.connect(settings=settings, num_cpus=8)
    master = session.ensure_master(settings)
    harness = Harness(master, settings, tmp_path_factory.mktemp("pipelines"))
    harness.git_host = git_host
    yield harness
    session.shutdown_embedded(master)


WEBHOOK_SECRET = "webhook-secret-" + "w" * 16
DEPLOY_KEY = "deploy-key-" + "k" * 24  # the default project's secret on the session cluster
WEB_DEPLOY_KEY = "web-deploy-key-" + "q" * 20  # project web's
HOOK_SECRET = "hook-secret-" + "h" * 20  # project web's: signs acme/web-app's webhooks
STATUS_TOKEN = "status-token-" + "s" * 20  # project web's: for acme/web-app's commit statuses


class GitHost:
    """Where the session's repository acme/web-app lives (a bare repository a test fills) and
    the port of the stand-in for its host's status API (a test serves it), as the
    repositories file the master and the API read names them."""

    def __init__(self, folder: Path) -> None:
        import socket

        self.bare = folder / "web-app.git"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.status_port = s.getsockname()[1]
        self.repos_file = folder / "repos.yaml"
        self.repos_file.write_text(f"""\
repositories:
  - name: acme/web-app
    url: file://{self.bare}
    provider: github
    project: web
    webhook_secret: HOOK_SECRET
    pipeline: .cicd-ray.yaml
    branches: ["main", "release/*"]
    status_url: http://127.0.0.1:{self.status_port}
    status_token: STATUS_TOKEN
""")


API_TOKEN = "test-token-" + "x" * 20
OTHER_TOKEN = "other-token-" + "y" * 20
# Tokens of projects, in the API's tokens file (`api_tokens_file`), by name.
PROJECT_TOKENS = {
    "web-read": ("read", "web"),
    "web-submit": ("submit", "web"),
    "ops-submit": ("submit", "ops"),
    "capped-submit": ("submit", "capped"),
}


def project_token(name: str) -> str:
    return f"token-of-{name}-" + "p" * 16


API_BODY_LIMIT = 1024 * 1024


def api_tokens_file(harness) -> Path:
    """The tokens file the API reads (again when it changes): the projects' tokens."""
    return harness.settings.home / "api-tokens"


@pytest.fixture(scope="session")
def api(harness):
    """The real Serve application on the session's cluster, on a free local port."""
    import socket

    import httpx
    from ray import serve

    from cicd_ray.api.serve import build
    from cicd_ray.tokens import Grant, Role, digest

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tokens_file = api_tokens_file(harness)
    tokens_file.write_text(
        "".join(
            Grant(digest=digest(project_token(name)), role=Role(role), project=project).line + "\n"
            for name, (role, project) in PROJECT_TOKENS.items()
        )
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build(
            [Grant(digest=digest(API_TOKEN)), Grant(digest=digest(OTHER_TOKEN))],
            tokens_file,
            max_body_bytes=API_BODY_LIMIT,
            settings=harness.settings,
        ),
        name="cicd",
        route_prefix="/",
        blocking=False,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    yield url
    serve.shutdown()


@pytest.fixture
def shared_dir():
    """A folder steps can write to and the test can read: steps run as users of their own,
    who cannot enter pytest's tmp_path (0700, root's)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="cicd-test-", dir="/var/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


CLI = [sys.executable, "-m", "cicd_ray.cli"]
CLI_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["CICD_RAY_HOME"] = str(tmp_path / "home")

    def call(*args: str, timeout: float = 240, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*CLI, *args],
            cwd=CLI_ROOT,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return call
