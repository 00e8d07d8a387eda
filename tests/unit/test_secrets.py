"""Secrets: read from files, refused when they cannot be masked, masked in the log stream
(multi-line, base64, split across chunks), given only to the steps that list them, and absent
from every record."""

from __future__ import annotations

import base64
import json
import random

import pytest

from cicd_ray.config import Settings
from cicd_ray.errors import SpecError
from cicd_ray.pipeline.load import parse_pipeline
from cicd_ray.pools import PoolConfig
from cicd_ray.reads.runs import run_view
from cicd_ray.secrets import Masker, SecretError, forms, missing, read
from cicd_ray.store.memory import MemoryStore
from tests.builders import make, submitted

TOKEN = "pypi-AgEIcHlwaS5vcmc-s3cr3t"
KEY = "-----BEGIN KEY-----\nMIIEowIBAAKCAQEAvK3y\nq9fZ8sT2wLm0pQ\n-----END KEY-----"


def masked(values, chunks):
    m = Masker(values)
    return b"".join(m.feed(c) for c in chunks) + m.flush()


def test_every_form_of_a_value_is_masked():
    b64 = base64.b64encode(TOKEN.encode())
    text = f"token={TOKEN}; b64={b64.decode()}; nopad={b64.rstrip(b'=').decode()}\n".encode()
    assert masked([TOKEN], [text]) == b"token=***; b64=***; nopad=***\n"
    # Each line of a multi-line value, wherever it is printed.
    out = masked([KEY], [f"key:\n{KEY}\nline again: MIIEowIBAAKCAQEAvK3y\n".encode()])
    assert out == b"key:\n***\nline again: ***\n"
    assert b"MIIEow" not in masked([KEY], [b"MIIEowIBAAKCAQEAvK3y"])
    assert masked([], [b"nothing to mask"]) == b"nothing to mask"


def test_basic_auth_url_json_and_embedded_base64_forms_are_masked():
    """Issue 24, item 16: HTTP Basic (`user:secret` in base64), URL-encoded and JSON-escaped
    forms, and base64 of a blob holding the value at offsets 1 and 2, all leaked."""
    secret = 'p@ss/w"rd+Ωmega=42'
    basic = base64.b64encode(f"deploy:{secret}".encode()).decode()
    url = "https://h/?p=p%40ss%2Fw%22rd%2B%CE%A9mega%3D42"
    as_json = json.dumps({"password": secret})
    for offset in (1, 2, 4, 5):
        blob = base64.b64encode(b"x" * offset + secret.encode() + b"tail-bytes").decode()
        out = masked([secret], [f"blob={blob}\n".encode()]).decode()
        assert "***" in out and not _decodes_to_secret(out, secret), (offset, out)
    for text in (
        f"Authorization: Basic {basic}",
        url,
        as_json,
        as_json.encode().decode("unicode_escape", errors="ignore"),
    ):
        out = masked([secret], [text.encode()]).decode(errors="replace")
        assert "***" in out, text
    header = masked([secret], [f"Authorization: Basic {basic}".encode()]).decode()
    assert "***" in header and not _decodes_to_secret(header, secret)
    assert masked([secret], [b"p%40ss%2Fw%22rd%2B%CE%A9mega%3D42"]) == b"***"
    assert masked([secret], [json.dumps(secret).encode()]) == b'"***"'


def _decodes_to_secret(text: str, secret: str) -> bool:
    import re as _re

    for word in _re.findall(r"[A-Za-z0-9+/=*]{8,}", text):
        try:
            if secret.encode() in base64.b64decode(word.replace("*", "") + "==="):
                return True
        except ValueError:
            pass
    return False


def test_a_value_split_across_chunks_is_masked_wherever_it_is_cut():
    text = f"before {TOKEN} middle {TOKEN}{TOKEN} after\n".encode()
    for cut in range(1, len(text)):
        assert masked([TOKEN], [text[:cut], text[cut:]]) == b"before *** middle ****** after\n", cut
    rng = random.Random(7)
    for _ in range(200):  # many small reads, as a slow step prints
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert masked([TOKEN, KEY], chunks) == b"before *** middle ****** after\n"


def test_what_is_held_back_is_only_what_could_start_a_secret():
    m = Masker([TOKEN])
    line = b"ordinary output, no secret at all\n"
    assert m.feed(line) == line  # a live log does not wait for the next read
    assert m.feed(b"almost: pypi-AgEI") == b"almost: "  # this may be the start of one
    assert m.feed(b"cHlwaS5vcmc-s3cr3t!") == b"***!"
    assert m.feed(b"pypi-Ag") == b"" and m.flush() == b"pypi-Ag"


def test_a_secret_is_read_from_its_file_and_refused_when_short_or_missing(tmp_path):
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "TOKEN").write_text(TOKEN + "\n")
    (tmp_path / "default" / "SHORT").write_text("abc\n")
    assert read(tmp_path, "default", "TOKEN") == TOKEN  # one trailing newline dropped
    with pytest.raises(SecretError, match="SHORT: shorter than 6 characters"):
        read(tmp_path, "default", "SHORT")
    with pytest.raises(SecretError, match="NOPE: project default has no such secret"):
        read(tmp_path, "default", "NOPE")
    assert missing(None, "default", ["TOKEN"]) == [
        "TOKEN: no secrets are configured here (set CICD_RAY_SECRETS_DIR)"
    ]
    assert missing(tmp_path, "default", ["TOKEN"]) == []
    assert TOKEN.encode() in forms(TOKEN)


@pytest.mark.parametrize(
    "step, problem",
    [
        (
            {"name": "a", "run": "x", "env": {"T": "v"}, "secrets": ["T"]},
            "steps[0] (a).secrets: T is also in env; a secret must not be",
        ),
        (
            {"name": "a", "run": "x", "secrets": ["CICD_X"]},
            "steps[0] (a).secrets: CICD_X: names starting with CICD_ are reserved for cicd-ray",
        ),
        (
            {"name": "a", "run": "x", "secrets": ["not a name"]},
            "steps[0] (a).secrets[0]: 'not a name' does not match ^[A-Za-z_][A-Za-z0-9_]*$",
        ),
    ],
)
def test_bad_secret_names_are_refused_naming_the_step(step, problem):
    with pytest.raises(SpecError) as err:
        parse_pipeline({"name": "p", "steps": [step]})
    assert err.value.problems == [problem]


@pytest.fixture
def settings(tmp_path):
    secrets = tmp_path / "secrets"
    (secrets / "default").mkdir(parents=True)
    (secrets / "default" / "TOKEN").write_text(TOKEN)
    (secrets / "default" / "KEY").write_text(KEY)
    secrets.chmod(0o700)
    return Settings(
        home=tmp_path / "home",
        secrets_dir=secrets,
        pools={"default": PoolConfig(name="default", workers=1, cpus=2)},
    )


def test_a_step_gets_only_the_secrets_it_lists_and_no_record_holds_them(settings):
    store = MemoryStore()
    core, driver = make(settings, store)
    run_id = submitted(
        core.submit(
            {
                "name": "s",
                "steps": [
                    {
                        "name": "uses",
                        "secrets": ["TOKEN", "KEY"],
                        "run": 'echo "t=$TOKEN"; printf %s "$TOKEN" | base64; echo "$KEY"; '
                        'echo "${TOKEN:0:4}-partial"',
                    },
                    {"name": "other", "run": 'echo "t=${TOKEN:-unset} k=${KEY:-unset}"'},
                ],
            }
        )
    )
    driver.run_until_idle()
    view = run_view(store, run_id)
    assert view.run.state.value == "succeeded"
    logs = {a.step: store.read_log(a.id) for a in view.attempts}
    assert logs["uses"] == b"t=***\n***\n***\npypi-partial\n"
    assert logs["other"] == b"t=unset k=unset\n"
    everything = json.dumps(view.model_dump(mode="json")) + "".join(
        json.dumps(e) for e in core.events.page(0, None)["events"]
    )
    for secret in (TOKEN, *KEY.splitlines()[1:3]):
        assert secret not in everything
    assert [s.spec.secrets for s in view.steps] == [["TOKEN", "KEY"], []]


def test_a_secret_the_project_lacks_is_refused_at_submission(settings):
    core, _ = make(settings)
    reply = core.submit(
        {
            "name": "s",
            "steps": [
                {"name": "t", "matrix": {"py": ["3.11", "3.12"]}, "secrets": ["NOPE"], "run": "x"}
            ],
        }
    )
    assert reply.problems == [
        "steps[t].secrets: NOPE: project default has no such secret (a "
        "file NOPE in CICD_RAY_SECRETS_DIR/default)"
    ]


def test_a_secret_gone_when_the_step_starts_fails_it_with_the_reason(settings):
    store = MemoryStore()
    core, driver = make(settings, store)
    run_id = submitted(
        core.submit({"name": "s", "steps": [{"name": "t", "secrets": ["TOKEN"], "run": "true"}]})
    )
    (settings.secrets_dir / "default" / "TOKEN").unlink()
    driver.run_until_idle()
    step = run_view(store, run_id).steps[0]
    assert step.state.value == "failed"
    assert "TOKEN: project default has no such secret" in step.reason


def test_a_run_s_own_secrets_reach_the_steps_that_list_them_and_go_when_it_ends(settings):
    store = MemoryStore()
    core, driver = make(settings, store)
    own = "run-scoped-value-" + "r" * 12
    pipeline = {
        "name": "own",
        "steps": [
            {
                "name": "deploy",
                "secrets": ["RUN_TOKEN", "TOKEN"],
                "run": 'echo "own=$RUN_TOKEN project=$TOKEN"',
            },
            {"name": "other", "needs": ["deploy"], "run": 'echo "${RUN_TOKEN:-unset}"'},
        ],
    }
    run_id = submitted(core.submit(pipeline, secrets={"RUN_TOKEN": own}, key="k1"))
    assert store.get_run_secrets(run_id) == {"RUN_TOKEN": own}  # stored with the run
    driver.run_until_idle()
    view = run_view(store, run_id)
    logs = {a.step: store.read_log(a.id) for a in view.attempts}
    assert logs == {"deploy": b"own=*** project=***\n", "other": b"unset\n"}
    assert store.get_run_secrets(run_id) == {}  # deleted when the run ended
    stored = json.dumps(view.model_dump(mode="json")) + json.dumps(
        store.get_key("k1").model_dump(mode="json")
    )
    assert own not in stored
    # A repeat with the same key is the same run, whatever the values; other names conflict.
    assert core.submit(pipeline, secrets={"RUN_TOKEN": "another-value"}, key="k1").run_id == run_id
    assert type(core.submit(pipeline, secrets={"OTHER": own}, key="k1")).__name__ == "Conflict"


def test_a_run_s_own_secrets_are_checked_without_quoting_them(settings):
    core, _ = make(settings)
    reply = core.submit(
        {"name": "own", "steps": [{"name": "a", "secrets": ["MISSING"], "run": "true"}]},
        secrets={"SHORT": "abc", "CICD_X": "long-enough-value", "bad name": "long-enough"},
    )
    assert reply.problems == [
        "secrets.SHORT: shorter than 6 characters: masking it in logs would mask ordinary text",
        "secrets.CICD_X: not a variable name (letters, digits, _; not starting with CICD_)",
        "secrets.bad name: not a variable name (letters, digits, _; not starting with CICD_)",
        "steps[a].secrets: MISSING: project default has no such secret (a file MISSING in "
        "CICD_RAY_SECRETS_DIR/default)",
    ]
    assert "long-enough" not in json.dumps(reply.problems)


def test_cicd_ray_s_own_lines_come_after_what_the_step_printed_and_are_masked(settings):
    store = MemoryStore()
    core, driver = make(settings, store)
    run_id = submitted(
        core.submit(
            {
                "name": "order",
                "steps": [
                    {
                        "name": "a",
                        "secrets": ["TOKEN"],
                        "artifacts": ["d/f"],
                        "run": "mkdir d; echo x > d/f; printf 'ends with pypi-Ag'",
                    }
                ],
            }
        )
    )
    driver.run_until_idle()
    [attempt] = run_view(store, run_id).attempts
    log = store.read_log(attempt.id).decode()
    assert log.startswith("ends with pypi-Ag[cicd-ray] artifacts kept: 1 file(s)"), log


def test_a_step_s_reason_and_kept_file_names_are_masked(tmp_path):
    """Issue 24, item 16: the reason a step ended and the paths of the files it kept were
    stored as they were, secret or not."""
    from cicd_ray.store.blobs import ArtifactStore
    from tests.builders import execute, task

    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    t = task('touch "$TOKEN.txt"; head -c 100 /dev/zero > "big-$TOKEN.bin"')
    t.step.secrets, t.secret_values = ["TOKEN"], {"TOKEN": TOKEN}
    t.step.artifacts, t.artifact_room_bytes = ["*.txt"], 10**6
    outcome, log, _ = execute(tmp_path, t, artifacts=store)
    assert [f.path for f in outcome.artifacts] == ["***.txt"]
    t = task('head -c 100 /dev/zero > "big-$TOKEN.bin"', attempt=2)
    t.step.secrets, t.secret_values = ["TOKEN"], {"TOKEN": TOKEN}
    t.step.artifacts, t.artifact_room_bytes = ["*.bin"], 10**6
    outcome, log, _ = execute(tmp_path, t, artifacts=store, artifact_max_bytes=10)
    assert outcome.state.value == "failed" and "big-***.bin" in outcome.reason
    assert TOKEN not in outcome.reason and TOKEN not in log


def test_a_run_s_own_secrets_go_once_no_step_that_lists_them_can_run(settings):
    """Issue 24, item 23: they stayed in the store until the whole run ended."""
    store = MemoryStore()
    core, driver = make(settings, store)
    pipeline = {
        "name": "own",
        "steps": [
            {"name": "deploy", "secrets": ["RUN_TOKEN"], "run": "true"},
            {"name": "long", "needs": ["deploy"], "run": "true"},
        ],
    }
    run_id = submitted(core.submit(pipeline, secrets={"RUN_TOKEN": "value-" + "v" * 12}))
    while not any(o.step == "deploy" for o in driver.outcomes):
        driver.carry_out()
        if driver.pending:
            driver.run_next()
        else:
            core.tick()
    core.tick()  # the outcome is taken up
    assert store.get_run(run_id).state.value == "running"  # `long` is still to run
    assert store.get_run_secrets(run_id) == {}
    driver.run_until_idle()
    assert store.get_run(run_id).state.value == "succeeded"
