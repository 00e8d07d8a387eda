"""The HTTP API: the FastAPI app (`application.py`), a router per resource, the front door
(`middleware.py`) and who may do what (`dependencies.py`); `serve.py` puts it on Ray Serve.

`cicd_ray.api:app`, the import path Serve configs name, is the Serve application. It is looked
up lazily, so importing the app, its routers and its models needs no Ray.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from cicd_ray.api.serve import app

        return app
    raise AttributeError(name)
