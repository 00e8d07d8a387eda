"""What needs Ray's own modules without a cluster: the shipped Serve config names an application
that imports and deployments that exist, and `up` refuses a bad proxy location before it starts
anything."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cicd_ray.config import Settings
from cicd_ray.errors import CicdError


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


def test_a_bad_proxy_location_is_refused_before_anything_starts(tmp_path):
    from cicd_ray.cluster import up

    with pytest.raises(
        CicdError,
        match="--proxy-location 'Everywhere': expected one of EveryNode, HeadOnly, Disabled",
    ):
        up.up(Settings(home=tmp_path), proxy_location="Everywhere")
    assert not (tmp_path / "up.json").exists()
