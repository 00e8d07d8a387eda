"""The API's front door, driven as ASGI (the app is the unit; no Serve, no master): a caller
without a token gets its 401 before one byte of its body is read, and every answer carries
the security headers."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.builders import TOKEN, call


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}]
)
def test_no_token_no_body_read(headers):
    status, hdrs, body, asked = call("/api/v1/runs", "POST", headers, b'{"pipeline": "x"}')
    assert status == 401 and asked == 0
    assert hdrs["www-authenticate"] == "Bearer"
    assert json.loads(body)["detail"].endswith("send 'Authorization: Bearer <token>'")


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/api/v1/workers"])
def test_the_schema_and_every_route_follow_the_same_rule(path):
    assert call(path)[0] == 401


def test_the_schema_with_a_token_and_no_third_party_docs():
    status, _, body, _ = call("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and "/api/v1/runs" in json.loads(body)["paths"]
    assert call("/docs", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 404


@pytest.mark.parametrize("path, status", [("/", 200), ("/ui/app.js", 200), ("/api/v1/runs", 401)])
def test_security_headers_on_every_answer(path, status):
    got, headers, _, _ = call(path)
    assert got == status
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp


def test_an_oversized_body_with_a_token_is_413():
    status, _, body, _ = call(
        "/api/v1/runs", "POST", {"Authorization": f"Bearer {TOKEN}"}, b"x" * 2048
    )
    assert status == 413 and b"over the 1024 byte limit" in body


def test_health_asks_the_master_at_most_once_a_second(monkeypatch):
    from cicd_ray.api import application as api
    from cicd_ray.api.link import MasterLink

    class Master:
        """A transport to the master that answers every ping and counts them."""

        calls = 0

        async def __call__(self, method, args, timeout_s):
            Master.calls += 1
            return {"pools": ["default"]}

    clock = [100.0]
    monkeypatch.setattr(api.time, "monotonic", lambda: clock[0])
    health = api._Health(MasterLink(Master()))

    async def probes(n):
        return [await health.check() for _ in range(n)]

    assert asyncio.run(probes(50))[-1] == (
        True,
        {"status": "ok", "master": True, "pools": ["default"]},
    )
    assert Master.calls == 1
    clock[0] += 1.5
    asyncio.run(probes(5))
    assert Master.calls == 2


def test_a_bad_token_setting_stops_the_api_at_its_start(monkeypatch):
    """Not a 500 on every request: the replica does not start, and says why."""
    from cicd_ray.api.application import check_config
    from cicd_ray.errors import CicdError

    check_config()  # nothing set: fine
    monkeypatch.setenv("CICD_RAY_TOKEN_DIGESTS", "REPLACE-WITH-SHA256-OF-YOUR-TOKEN")
    with pytest.raises(
        CicdError, match=r"CICD_RAY_TOKEN_DIGESTS: REPLACE-\.\.\.: expected a SHA-256"
    ):
        check_config()
