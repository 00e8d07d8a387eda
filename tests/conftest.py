"""Fixtures every test folder may use."""

from __future__ import annotations

import pytest

from tests.integration.clusters import start_redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free port, with AOF on, for the whole session."""
    url, proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(timeout=10)
