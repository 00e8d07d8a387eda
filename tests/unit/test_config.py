"""Settings from the environment and the options of `cicd-ray up --ha`: bad values are named."""

from __future__ import annotations

import pytest

from cicd_ray.config import Ha, Settings
from cicd_ray.errors import CicdError, SettingsError


def test_master_resources_from_the_environment():
    settings = Settings.from_env(
        {"CICD_RAY_HOME": "/tmp/x", "CICD_RAY_MASTER_RESOURCES": '{"cicd-control": 0.01}'}
    )
    assert settings.master_resources == {"cicd-control": 0.01}


@pytest.mark.parametrize("value", ["{not json", '["cicd-control"]', '{"a": "lots"}'])
def test_bad_master_resources_are_named(value):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"CICD_RAY_HOME": "/tmp/x", "CICD_RAY_MASTER_RESOURCES": value})
    assert "master_resources" in str(caught.value) or "CICD_RAY_MASTER_RESOURCES" in str(
        caught.value
    )


@pytest.mark.parametrize(
    "url, address, password",
    [
        ("redis://127.0.0.1:6379", "127.0.0.1:6379", None),
        ("redis://:s3cret@redis.internal:6380/0", "redis.internal:6380", "s3cret"),
        ("redis.internal:7000", "redis.internal:7000", None),
    ],
)
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


# Every setting read from the environment as a number: (variable, a good value and the field it
# sets with what it becomes, values refused).
NUMBERS = [
    ("CICD_RAY_HEARTBEAT_INTERVAL_S", "0.5", "heartbeat_interval_s", 0.5, ["0", "-1", "soon"]),
    ("CICD_RAY_HEARTBEAT_TIMEOUT_S", "30", "heartbeat_timeout_s", 30.0, ["0", "x"]),
    ("CICD_RAY_LOG_CAP_BYTES", "1000", "log_cap_bytes", 1000, ["0", "1.5", "5MB"]),
    ("CICD_RAY_KILL_GRACE_S", "0", "kill_grace_s", 0.0, ["-1", "never"]),
    ("CICD_RAY_RETENTION_DAYS", "0.5", "retention_days", 0.5, ["-1", "7d"]),
    (
        "CICD_RAY_SOURCE_UNPACKED_LIMIT_BYTES",
        "4096",
        "source_unpacked_limit_bytes",
        4096,
        ["0", "2GiB"],
    ),
]


@pytest.mark.parametrize("var, good, field, value, bad", NUMBERS, ids=[n[0] for n in NUMBERS])
def test_every_number_setting_is_parsed_and_a_bad_one_is_named(var, good, field, value, bad):
    home = {"CICD_RAY_HOME": "/tmp/x"}
    assert getattr(Settings.from_env({**home, var: good}), field) == value
    assert getattr(Settings.from_env(home), field) == Settings.model_fields[field].default
    for text in bad:
        with pytest.raises(SettingsError) as caught:
            Settings.from_env({**home, var: text})
        [problem] = caught.value.problems
        assert problem.startswith(f"{var}: {text!r}: "), problem


def test_a_bad_api_setting_stops_the_api_at_its_start(monkeypatch):
    from cicd_ray.api.application import check_config

    monkeypatch.setenv("CICD_RAY_MAX_BODY_BYTES", "lots")
    with pytest.raises(SettingsError, match="CICD_RAY_MAX_BODY_BYTES: 'lots'"):
        check_config()  # refused when an API replica starts, not on every request


def test_the_pipeline_limit_reaches_every_reader(tmp_path):
    """CICD_RAY_MAX_PIPELINE_BYTES, read into the settings, bounds what the core plans."""
    from cicd_ray.master.admission import plan_submission

    settings = Settings.from_env(
        {"CICD_RAY_HOME": str(tmp_path), "CICD_RAY_MAX_PIPELINE_BYTES": "64"}
    )
    text = "name: p\nsteps:\n  - {name: a, run: " + "x" * 100 + "}\n"
    planned = plan_submission(text, {}, None, settings)
    assert planned.problems and "CICD_RAY_MAX_PIPELINE_BYTES" in planned.problems[0]
    assert not plan_submission(text, {}, None, Settings(home=tmp_path)).problems


def test_tokens_url_and_token_are_settings(tmp_path):
    from cicd_ray import tokens

    settings = Settings.from_env(
        {
            "CICD_RAY_HOME": str(tmp_path),
            "CICD_RAY_TOKENS": "t1",
            "CICD_RAY_URL": "http://api:8000",
            "CICD_RAY_TOKEN": "t1",
        }
    )
    assert settings.token_grants == [tokens.Grant(digest=tokens.digest("t1"))]
    assert (settings.url, settings.token) == ("http://api:8000", "t1")
    assert "t1" not in repr(settings)  # the token never shows in a repr or a log line
    import pickle

    shipped = pickle.loads(pickle.dumps(settings))  # as Ray hands settings to the actors
    assert shipped.token == "" and shipped.url == settings.url
    with pytest.raises(SettingsError, match="CICD_RAY_TOKEN_DIGESTS: nope"):
        Settings.from_env({"CICD_RAY_TOKEN_DIGESTS": "nope"})


@pytest.mark.parametrize(
    "var, field",
    [("CICD_RAY_LOOKAHEAD", "lookahead"), ("CICD_RAY_KEEP_WORKSPACES", "keep_workspaces")],
)
def test_switches(var, field):
    home = {"CICD_RAY_HOME": "/tmp/x"}
    for text, value in [("1", True), ("true", True), ("0", False), ("false", False)]:
        assert getattr(Settings.from_env({**home, var: text}), field) is value
    with pytest.raises(SettingsError, match=f"{var}: 'maybe': expected 1 or 0"):
        Settings.from_env({**home, var: "maybe"})


def test_notification_settings_and_what_workers_are_given(tmp_path):
    import pickle

    settings = Settings.from_env(
        {
            "CICD_RAY_HOME": str(tmp_path),
            "CICD_RAY_WEBHOOK_SECRET": "sign-with-me",
            "CICD_RAY_WEBHOOK_ALLOW": "127.0.0.1,10.0.0.0/8",
            "CICD_RAY_NOTIFY_WEBHOOK": "https://hooks.example.com/all",
        }
    )
    assert settings.webhook_allow == ["127.0.0.1", "10.0.0.0/8"]
    assert settings.notify_webhook == "https://hooks.example.com/all"
    # The master signs with it (it travels to the master with the settings) ...
    assert pickle.loads(pickle.dumps(settings)).webhook_secret == "sign-with-me"
    assert "sign-with-me" not in repr(settings)
    # ... the workers are not given it.
    assert settings.for_workers().webhook_secret == ""
    with pytest.raises(SettingsError, match="CICD_RAY_NOTIFY_WEBHOOK: 'ftp://x' is not an"):
        Settings.from_env({"CICD_RAY_HOME": str(tmp_path), "CICD_RAY_NOTIFY_WEBHOOK": "ftp://x"})
