"""Notifications' pure parts: where they may go, the signature, the retry times."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from cicd_ray.config import Settings
from cicd_ray.errors import SettingsError
from cicd_ray.notify.webhooks import (
    TargetRefused,
    checked_address,
    next_try,
    parse_allow,
    project_key,
    refused_targets,
    sign,
    verify,
)


def test_the_signature_is_hmac_sha256_of_the_time_and_body_under_the_project_s_key():
    """Issue 24, item 20: a key per project (derived from CICD_RAY_WEBHOOK_SECRET), over a
    timestamp and a body that names the project, the run and the delivery."""
    body = b'{"delivery": "r1/0", "project": "web", "run": "r1"}'
    key = project_key("s3cret", "web")
    assert key == hmac.new(b"s3cret", b"cicd-ray notify web", hashlib.sha256).hexdigest()
    assert key != project_key("s3cret", "ops")
    expected = hmac.new(key.encode(), b"1000." + body, hashlib.sha256).hexdigest()
    assert sign(body, key, 1000) == f"sha256={expected}"
    assert verify(body, key, f"sha256={expected}", "1000", now=1010)
    assert not verify(body, key, f"sha256={expected}", "1000", now=1000 + 301)  # a replay
    assert not verify(body, key, f"sha256={expected}", "1001", now=1010)
    assert not verify(body + b" ", key, f"sha256={expected}", "1000", now=1010)
    assert not verify(body, project_key("s3cret", "ops"), f"sha256={expected}", "1000", now=1010)
    assert not verify(body, key, "", "1000", now=1010)


@pytest.mark.parametrize(
    "url, refused",
    [
        ("https://hooks.example.com/x", False),
        ("http://localhost:8000/x", True),
        ("http://app.localhost/x", True),
        ("http://127.0.0.1/x", True),
        ("http://10.1.2.3/x", True),
        ("http://169.254.169.254/latest/meta-data", True),  # a cloud's metadata endpoint
        ("http://[::1]:9000/x", True),
        ("http://192.168.1.5/x", True),
        # Issue 24, item 22: IPv6 forms that carry an internal IPv4 address.
        ("http://[64:ff9b::a9fe:a9fe]/x", True),  # NAT64 of 169.254.169.254
        ("http://[2002:a00:1::1]/x", True),  # 6to4 of 10.0.0.1
        ("http://[::ffff:127.0.0.1]/x", True),
        ("http://[64:ff9b::808:808]/x", False),  # NAT64 of a public address
        ("http://8.8.8.8/x", False),
    ],
)
def test_loopback_and_private_targets_are_refused_at_submission(url, refused):
    assert bool(refused_targets([url], [])) is refused


def test_the_allow_list_takes_hosts_and_networks():
    allow = parse_allow(" 127.0.0.1, 10.0.0.0/8 ,hooks.internal")
    assert allow == ["127.0.0.1", "10.0.0.0/8", "hooks.internal"]
    assert refused_targets(
        ["http://127.0.0.1:9/x", "http://10.9.9.9/x", "http://192.168.0.1/x"], allow
    ) == [
        (
            2,
            "192.168.0.1 is a loopback or private address; list it in CICD_RAY_WEBHOOK_ALLOW "
            "to send notifications there",
        )
    ]
    for bad in ("10.0.0.0/99", "a b", "http://x"):
        with pytest.raises(ValueError):
            parse_allow(bad)
    with pytest.raises(SettingsError, match=r"CICD_RAY_WEBHOOK_ALLOW: .10\.0\.0\.0/99. is not"):
        Settings.from_env({"CICD_RAY_HOME": "/tmp/x", "CICD_RAY_WEBHOOK_ALLOW": "10.0.0.0/99"})


def test_a_name_that_resolves_inside_is_refused_when_sent_and_the_address_is_pinned():
    inside = lambda host, port: ["10.0.0.7"]  # noqa: E731  (a DNS answer pointing inside)
    with pytest.raises(TargetRefused, match=r"hooks\.example\.com resolves to 10\.0\.0\.7"):
        checked_address("https://hooks.example.com/x", [], inside)
    assert checked_address("https://hooks.example.com/x", ["10.0.0.0/8"], inside) == "10.0.0.7"
    mixed = lambda host, port: ["93.184.216.34", "127.0.0.1"]  # noqa: E731
    with pytest.raises(TargetRefused):
        checked_address("https://h.example.com/x", [], mixed)
    assert (
        checked_address("https://h.example.com/x", [], lambda host, port: ["93.184.216.34"])
        == "93.184.216.34"
    )


def test_retries_back_off_and_stop_at_the_delivery_window():
    assert next_try(1, 0.0, 10.0) == 11.0
    assert next_try(3, 0.0, 10.0) == 14.0
    assert next_try(20, 0.0, 10.0) == 70.0  # capped at a minute apart
    assert next_try(20, 0.0, 899.0) is None
