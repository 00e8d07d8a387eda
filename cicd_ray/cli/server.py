"""The commands of a long-running cluster: `up`, `down`, and `kuberay`, which writes its
manifests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from cicd_ray.cli.connect import warn_python
from cicd_ray.cli.root import app, fail, out
from cicd_ray.config import Settings
from cicd_ray.errors import CicdError
from cicd_ray.pools import load_pools


@app.command()
def up(
    port: int = typer.Option(8000, help="the API's port"),
    host: str = typer.Option("127.0.0.1", help="the address the API listens on"),
    address: str | None = typer.Option(
        None, help="join this Ray cluster instead of starting a local head"
    ),
    ha: str | None = typer.Option(
        None,
        help="GCS fault tolerance: keep the head's GCS tables in this Redis "
        "(redis://[:PASSWORD@]HOST:PORT); `up` again after the head died replaces it",
    ),
    ha_namespace: str = typer.Option(
        "cicd-ray", help="the GCS's key prefix in that Redis (one per cluster)"
    ),
    head_cpus: int | None = typer.Option(
        None, help="CPUs the head offers (0: steps and workers only on worker nodes)"
    ),
    proxy_location: str = typer.Option(
        "EveryNode", help="Serve's HTTP proxies: EveryNode (the API survives the head) or HeadOnly"
    ),
    ray_port: int | None = typer.Option(None, help="the new head's GCS port (Ray's default: 6379)"),
    dashboard_port: int | None = typer.Option(
        None, help="the new head's dashboard and job API port (Ray's default: 8265)"
    ),
    local_autoscaling: Path | None = typer.Option(
        None,
        exists=True,
        dir_okay=False,
        help="a pools file: start a local autoscaling "
        "cluster (Ray's fake multi-node provider) with a node type per pool",
    ),
    node_idle_timeout: float = typer.Option(
        60.0, help="with --local-autoscaling: seconds an idle node lives"
    ),
):
    """Start (or join) a Ray cluster with the master and the HTTP API, and leave it running."""
    from cicd_ray.cluster import up

    try:
        options = up.Ha.from_url(ha, ha_namespace) if ha else None
        settings = Settings.from_env()
        warn_python(settings)
        started = up.up(
            settings,
            host=host,
            port=port,
            address=address,
            ha=options,
            head_cpus=head_cpus,
            proxy_location=proxy_location,
            ray_port=ray_port,
            local_autoscaling=local_autoscaling,
            node_idle_timeout_s=node_idle_timeout,
            dashboard_port=dashboard_port,
        )
    except CicdError as e:
        raise fail(str(e)) from None
    _print_started(started, options)


@app.command()
def down(
    address: str | None = typer.Option(None, help="the cluster, if not the one `up` recorded"),
):
    """Stop what `cicd-ray up` started."""
    from cicd_ray.cluster import up

    try:
        stopped = up.down(Settings.from_env(), address=address)
    except CicdError as e:
        raise fail(str(e)) from None
    out.print("stopped " + ", ".join(stopped))


@app.command()
def kuberay(
    pools: Path = typer.Argument(..., exists=True, dir_okay=False, help="the pools file"),
    image: str = typer.Option(
        "registry.example.com/cicd-ray:0.1.0", help="the image built from kuberay/Dockerfile"
    ),
):
    """Print the KubeRay manifests (a ConfigMap with the pools, the RayService) for a pools
    file (and the projects it lists): `cicd-ray kuberay kuberay/pools.yaml >
    kuberay/rayservice.yaml`."""
    from importlib.metadata import version

    from cicd_ray.cluster.kuberay import projects_of, render

    try:
        text = render(
            load_pools(pools),
            pools.read_text(encoding="utf-8"),
            image,
            version("ray"),
            projects_of(pools),
        )
    except CicdError as e:
        raise fail(str(e)) from None
    sys.stdout.write(text)


def _print_started(started, options) -> None:
    """Where the cluster, the API and the dashboard are, and the token when one was made."""
    how = (
        " (a new head replaced the one that died)"
        if started.replaced_head
        else " (the head an earlier `cicd-ray up` started)"
        if started.reused_head
        else " (a local head started for it)"
        if started.started_head
        else ""
    )
    out.print(
        f"cicd-ray is up on Ray at {started.address}{how}"
        f"{'; GCS fault tolerance on ' + options.redis_address if options else ''}"
    )
    out.print(
        f"  API:        {started.api_url}   "
        f"(OpenAPI: {started.api_url}/openapi.json, with the token)"
    )
    if started.dashboard_url:
        out.print(f"  dashboard:  {started.dashboard_url}   (Ray's token: `ray get-auth-token`)")
    if started.token:
        out.print("  a new API token was created; it is shown only now:")
        out.print(f"    export CICD_RAY_URL={started.api_url}")
        out.print(f"    export CICD_RAY_TOKEN={started.token}")
    else:
        out.print(
            f"  authenticate with a configured token: export CICD_RAY_URL="
            f"{started.api_url} CICD_RAY_TOKEN=<your token>"
        )
    out.print("  stop it with: cicd-ray down")
