"""The API on Ray Serve, the only module that imports Serve: the deployment wrapping the app
(`app`, import path `cicd_ray.api:app`, for `serve run`, `serve deploy` and a RayService's
`serveConfigV2`), the link to the master actor by its name, and `build` for `cicd-ray up`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, HTTPException
from ray import serve

from cicd_ray import tokens
from cicd_ray.api.application import check_config, create_app
from cicd_ray.api.link import RETRY_AFTER_S, MasterLink
from cicd_ray.config import Settings
from cicd_ray.names import MASTER_NAME, NAMESPACE


class RayTransport:
    """How the API's calls reach the master on Ray: its handle, found by name and found again
    after the master restarts; a master that does not answer is a 503 to retry."""

    def __init__(self) -> None:
        self._handle = None

    async def __call__(self, method: str, args: tuple, timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(self._call(method, *args), timeout_s)
        except (ValueError, ray.exceptions.RayError, asyncio.TimeoutError) as e:
            self._handle = None
            raise HTTPException(
                503,
                detail=f"the master is not answering ({type(e).__name__}); retry shortly",
                headers={"Retry-After": RETRY_AFTER_S},
            ) from None

    async def _call(self, method: str, *args: Any) -> Any:
        if self._handle is None:
            # A lookup asks the GCS, which may be down: in a thread, so this replica's other
            # requests (reads from the store, 4xx answers) go on meanwhile.
            self._handle = await asyncio.to_thread(ray.get_actor, MASTER_NAME, namespace=NAMESPACE)
        return await getattr(self._handle, method).remote(*args)


def app_on_ray() -> FastAPI:
    """The app of a Serve replica, built there (with its environment), linked through Ray."""
    return create_app(master=MasterLink(RayTransport()))


# The handlers only await the master, so one replica can serve many requests at once.
# A line per request in Serve's access log costs more than the request's own work here; the
# master records every submission anyway.
@serve.deployment(
    name="cicd-api",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=200,
    logging_config={"enable_access_log": False, "log_level": "WARNING"},
)
@serve.ingress(app_on_ray)  # built on each replica, with its environment
class ApiServer:
    """The Serve deployment wrapping the FastAPI app."""

    def __init__(self) -> None:
        # Where the app is the whole deployment (a RayService's serveConfigV2), nothing else
        # creates the master: make sure it exists, configured from this replica's environment.
        # A master already running is left as it is. Not waited for: /healthz tells.
        from cicd_ray.master.actor import master_actor

        settings = check_config()
        master_actor(settings).remote(settings)


def build(
    grants: list[tokens.Grant],
    tokens_file: Path | None = None,
    max_body_bytes: int | None = None,
    settings: Settings | None = None,
):
    """The Serve application with its configuration in the replicas' environment (grants by
    the tokens' digests, never the tokens; the tokens file they read again when it changes;
    from `settings`, the repositories file and the secrets folder webhooks are checked
    with)."""
    env = {tokens.DIGESTS_ENV: ",".join(g.line for g in grants)}
    if tokens_file is not None:
        env["CICD_RAY_TOKENS_FILE"] = str(tokens_file)
    if settings is not None and settings.repos_file is not None:
        env["CICD_RAY_REPOS"] = str(settings.repos_file)
    if settings is not None and settings.secrets_dir is not None:
        env["CICD_RAY_SECRETS_DIR"] = str(settings.secrets_dir)
    if max_body_bytes:
        env["CICD_RAY_MAX_BODY_BYTES"] = str(max_body_bytes)
    return ApiServer.options(
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}}
    ).bind()


app = ApiServer.bind()
