"""Settings from the environment and the options of `cicd-ray up --ha`: bad values are named."""

from __future__ import annotations

import pytest

from cicd_ray.config import Settings
from cicd_ray.errors import CicdError, SpecError
from cicd_ray.server import Ha


def test_master_resources_from_the_environment():
    settings = Settings.from_env({"CICD_RAY_HOME": "/tmp/x",
                                  "CICD_RAY_MASTER_RESOURCES": '{"cicd-control": 0.01}'})
    assert settings.master_resources == {"cicd-control": 0.01}


@pytest.mark.parametrize("value", ["{not json", '["cicd-control"]', '{"a": "lots"}'])
def test_bad_master_resources_are_named(value):
    with pytest.raises(SpecError) as caught:
        Settings.from_env({"CICD_RAY_HOME": "/tmp/x", "CICD_RAY_MASTER_RESOURCES": value})
    assert "master_resources" in str(caught.value) or "CICD_RAY_MASTER_RESOURCES" in str(
        caught.value)


@pytest.mark.parametrize("url, address, password", [
    ("redis://127.0.0.1:6379", "127.0.0.1:6379", None),
    ("redis://:s3cret@redis.internal:6380/0", "redis.internal:6380", "s3cret"),
    ("redis.internal:7000", "redis.internal:7000", None),
])
def test_ha_redis_urls(url, address, password):
    ha = Ha.from_url(url, namespace="ci-1")
    assert (ha.redis_address, ha.password) == (address, password)
    env = ha.env()
    assert env["RAY_REDIS_ADDRESS"] == address
    assert env["RAY_external_storage_namespace"] == "ci-1"
    assert int(env["RAY_gcs_rpc_server_reconnect_timeout_s"]) > 60  # longer than Ray's default
    assert password is None or password not in str(env)  # the password goes on the command line


@pytest.mark.parametrize("url", ["", "redis://host", "http://host:80", "host:port"])
def test_bad_ha_urls_say_what_is_accepted(url):
    with pytest.raises(CicdError, match=r"--ha .*expected redis://\[:PASSWORD@\]HOST:PORT"):
        Ha.from_url(url)


def test_a_bad_proxy_location_is_refused_before_anything_starts(tmp_path):
    from cicd_ray import server

    with pytest.raises(CicdError, match="--proxy-location 'Everywhere': expected one of "
                                        "EveryNode, HeadOnly, Disabled"):
        server.up(Settings(home=tmp_path), proxy_location="Everywhere")
    assert not (tmp_path / "up.json").exists()
