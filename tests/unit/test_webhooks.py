"""Notifications' pure parts: where they may go, the signature, the retry times."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from cicd_ray.config import Settings
from cicd_ray.errors import SettingsError
from cicd_ray.webhooks import (
    TargetRefused,
    checked_address,
    next_try,
    parse_allow,
    refused_targets,
    sign,
    verify,
)


def test_the_signature_is_hmac_sha256_of_the_body_as_documented():
    body = b'{"run": "r1"}'
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert sign(body, "s3cret") == f"sha256={expected}"
    assert verify(body, "s3cret", f"sha256={expected}")
    assert not verify(body + b" ", "s3cret", f"sha256={expected}")
    assert not verify(body, "other", f"sha256={expected}") and not verify(body, "s3cret", "")


@pytest.mark.parametrize("url, refused", [
    ("https://hooks.example.com/x", False),
    ("http://localhost:8000/x", True),
    ("http://app.localhost/x", True),
    ("http://127.0.0.1/x", True),
    ("http://10.1.2.3/x", True),
    ("http://169.254.169.254/latest/meta-data", True),  # a cloud's metadata endpoint
    ("http://[::1]:9000/x", True),
    ("http://192.168.1.5/x", True),
    ("http://8.8.8.8/x", False),
])
def test_loopback_and_private_targets_are_refused_at_submission(url, refused):
    assert bool(refused_targets([url], [])) is refused


def test_the_allow_list_takes_hosts_and_networks():
    allow = parse_allow(" 127.0.0.1, 10.0.0.0/8 ,hooks.internal")
    assert allow == ["127.0.0.1", "10.0.0.0/8", "hooks.internal"]
    assert refused_targets(["http://127.0.0.1:9/x", "http://10.9.9.9/x",
                            "http://192.168.0.1/x"], allow) == [
        (2, "192.168.0.1 is a loopback or private address; list it in CICD_RAY_WEBHOOK_ALLOW "
            "to send notifications there")]
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
    assert checked_address("https://h.example.com/x", [],
                           lambda host, port: ["93.184.216.34"]) == "93.184.216.34"


def test_retries_back_off_and_stop_at_the_delivery_window():
    assert next_try(1, 0.0, 10.0) == 11.0
    assert next_try(3, 0.0, 10.0) == 14.0
    assert next_try(20, 0.0, 10.0) == 70.0  # capped at a minute apart
    assert next_try(20, 0.0, 899.0) is None
