"""Fixtures every test folder may use, and a test run kept apart from the caller's machine.

A test run neither joins nor touches what the caller has: `RAY_ADDRESS` and every
`CICD_RAY_*` setting of the calling shell are dropped, and Ray's temporary folder (where
`ray start` notes "the cluster on this machine", read by `address="auto"`) is one of the
session's own, so another Ray on this machine is neither found nor changed."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.integration.clusters import start_redis

for _name in [n for n in os.environ if n == "RAY_ADDRESS" or n.startswith("CICD_RAY_")]:
    del os.environ[_name]
# Short: Ray's Unix sockets live below it, and a socket path has at most 107 bytes.
os.environ["RAY_TMPDIR"] = RAY_TMPDIR = tempfile.mkdtemp(prefix="cicd-t-", dir="/tmp")
os.chmod(RAY_TMPDIR, 0o755)


def pytest_unconfigure(config):
    shutil.rmtree(RAY_TMPDIR, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on a free port, with AOF on, for the whole session."""
    url, proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(timeout=10)
