"""The shipped Serve config names an application that imports and deployments that exist."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema


def test_serve_config_is_valid_and_points_at_the_app():
    doc = yaml.safe_load(Path("deploy/serve-config.yaml").read_text())
    config = (
        ServeDeploySchema.model_validate(doc)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(doc)
    )
    (app,) = config.applications
    module, _, attr = app.import_path.partition(":")
    built = getattr(importlib.import_module(module), attr)
    assert type(built).__name__ == "Application"
    from cicd_ray.api.serve import ApiServer

    assert [d.name for d in app.deployments] == [ApiServer.name]
