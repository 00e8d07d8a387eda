"""The `cicd-ray` command line: a root app (`cicd_ray.cli.root`) and a module per surface, each
adding its commands to the root's app when imported here. No command module imports another."""

from __future__ import annotations

from cicd_ray.cli import builds, flow, ops, runs, server, tenants  # noqa: F401  (commands)
from cicd_ray.cli.root import app


def main() -> None:
    """The console script `cicd-ray` (and `python -m cicd_ray`)."""
    app()
