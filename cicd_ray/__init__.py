"""cicd-ray: a distributed CI/CD build runtime on Ray."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Client", "Run"]


def __getattr__(name: str):
    # Lazy, so `import cicd_ray` stays cheap for the worker and the CLI's store-only commands.
    if name in __all__:
        from cicd_ray import client

        return getattr(client, name)
    raise AttributeError(name)
