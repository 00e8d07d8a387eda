"""Pipelines as people write them (YAML 1.2), and hostile ones refused fast by a named limit."""

from __future__ import annotations

import resource
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cicd_ray.errors import SpecError
from cicd_ray.pipeline.graph import plan
from cicd_ray.pipeline.load import parse_pipeline
from cicd_ray.pipeline.yamldoc import load
from tests.builders import HOSTILE, chain


def problems_of(doc) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_pipeline(doc)
    return info.value.problems


def step_names(text: str) -> list[str]:
    return [s.name for s in plan(parse_pipeline(text))]


# --- YAML 1.2 as written ---------------------------------------------------------------------


def test_retry_on_as_documented_is_accepted():
    text = (
        "name: r\nsteps:\n  - name: a\n    run: 'true'\n    retry: {max: 2, on: [infra, failure]}\n"
    )
    (step,) = plan(parse_pipeline(text))
    assert (step.retry_max, step.retry_on) == (2, ["infra", "failure"])


def test_yaml_11_booleans_and_numbers_are_plain_strings():
    doc = load(
        "a: on\nb: yes\nc: No\nd: 010\ne: 1:20\nf: 2026-11-28\ng: true\nh: ~\n"
        "i: 0x1f\nj: 0o17\nk: .inf\n"
    )
    assert doc == {
        "a": "on",
        "b": "yes",
        "c": "No",
        "d": 10,
        "e": "1:20",
        "f": "2026-11-28",
        "g": True,
        "h": None,
        "i": 31,
        "j": 15,
        "k": float("inf"),
    }
    assert list(load("on: push\n")) == ["on"]


def test_matrix_values_keep_their_text():
    text = (
        "name: m\nsteps:\n  - name: t\n    run: 'true'\n"
        "    matrix: {py: [3.10, 3.11, 3.9], flag: [on, true]}\n"
    )
    assert step_names(text) == [
        "t[py=3.10,flag=on]",
        "t[py=3.10,flag=true]",
        "t[py=3.11,flag=on]",
        "t[py=3.11,flag=true]",
        "t[py=3.9,flag=on]",
        "t[py=3.9,flag=true]",
    ]
    assert plan(parse_pipeline(text))[0].env["MATRIX_PY"] == "3.10"


@pytest.mark.parametrize(
    "values, first, second",
    [
        ("[a, a]", "'a'", "'a'"),
        ("[1, '1']", "1", "'1'"),
        ("[true, 'true']", "True", "'true'"),
    ],
)
def test_matrix_values_naming_one_variant_are_rejected_naming_both(values, first, second):
    text = f"name: m\nsteps:\n  - name: t\n    run: x\n    matrix: {{k: {values}}}\n"
    assert problems_of(text) == [
        f"steps[0] (t).matrix.k: values [0] {first} and [1] {second} both name the variant "
        f"{second.strip(chr(39)) if second != 'True' else 'true'!r}; make them distinct"
    ]


@pytest.mark.parametrize("value", ["x y", "a/b", "a,b", "k=v", "x]", "é", "''"])
def test_matrix_values_outside_the_safe_set_are_rejected(value):
    text = f'name: m\nsteps:\n  - name: t\n    run: x\n    matrix: {{k: [ok, "{value}"]}}\n'
    (problem,) = problems_of(text)
    assert problem.startswith("steps[0] (t).matrix.k: value [1]")
    assert "may hold only letters, digits and . _ + @ : -" in problem


# --- hostile documents: a named limit, within a second --------------------------------------


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_document_is_refused_within_a_second_naming_the_limit(name):
    text, expected = HOSTILE[name]
    started = time.perf_counter()
    problems = problems_of(text)
    elapsed = time.perf_counter() - started
    assert any(expected in p for p in problems), problems
    assert elapsed < 1.0, f"{name}: {elapsed:.2f} s"
    assert all(len(p) < 1000 for p in problems)


def test_hostile_dict_from_json_is_refused():
    deep: list = []
    for _ in range(200):
        deep = [deep]
    assert any("levels deep" in p for p in problems_of({"name": "x", "steps": deep}))


def test_a_huge_bad_value_is_not_repeated_whole():
    (problem,) = problems_of({"name": "x" * 100_000, "steps": [{"name": "a", "run": "x"}]})
    assert len(problem) < 400 and problem.startswith("name: 'xxx")


@pytest.mark.parametrize("reverse", [False, True])
def test_a_3000_step_chain_is_valid_and_plans(reverse):
    started = time.perf_counter()
    steps = plan(parse_pipeline(chain(3000, reverse)))
    assert len(steps) == 3000 and time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    "name", ["matrix of 10 keys x 10 values", "billion laughs", "quadratic needs", "64 MiB"]
)
def test_cicd_ray_validate_exits_2_within_a_second(name, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(HOSTILE[name][0])
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", "from cicd_ray.cli import main; main()", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert HOSTILE[name][1] in " ".join((done.stdout + done.stderr).split())
    # The interpreter's own start (and the CLI's imports) is not the parser's time.
    assert time.perf_counter() - started < 15.0


# --- property: anything at all gets an answer or a SpecError, fast and small -----------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
_docs = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=10), inner, max_size=6)
    ),
    max_leaves=60,
)
_yaml_bits = st.lists(
    st.sampled_from(
        [
            "name: x\n",
            "steps:\n",
            "  - name: a\n",
            "    run: x\n",
            "    needs: [a]\n",
            "&a ",
            "*a ",
            "[",
            "]",
            "{",
            "}",
            ": ",
            "- ",
            "    matrix: {k: [1, 2, 3]}\n",
            "on: [infra]\n",
            "'",
            '"',
            "\t",
            "!!python/object:os.system ",
            "? ",
            "|\n",
            "---\n",
            "%YAML 1.1\n",
            "\x00",
        ]
    ),
    max_size=40,
).map("".join)


def _bounded(doc) -> None:
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        plan(parse_pipeline(doc))
    except SpecError as e:
        assert all(len(p) < 2000 for p in e.problems)
    assert time.perf_counter() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_docs)
def test_any_parsed_document_is_answered_in_bounds(doc):
    _bounded(doc)
    _bounded({"name": "x", "steps": [doc]})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_yaml_bits)
def test_any_yaml_text_is_answered_in_bounds(text):
    _bounded(text)


def test_the_amplification_request_is_refused_by_a_named_limit_and_stores_nothing(tmp_path):
    """Issue 24, item 9: a request of about a megabyte stored 4.9 GiB (its env copied into
    each of 5,000 planned steps; a pipeline sent as a JSON object skipped the byte limit)."""
    import json

    from cicd_ray.config import Settings
    from cicd_ray.master.core import MasterCore
    from cicd_ray.protocol import Rejected
    from cicd_ray.store.memory import MemoryStore

    core = MasterCore(Settings(home=tmp_path), MemoryStore(), clock=lambda: 0.0)
    matrix = {"a": [f"v{i}" for i in range(16)], "b": [f"w{i}" for i in range(16)]}
    fat = {f"V{i}": "x" * 30_000 for i in range(4)}  # 120 KB: within a step's env
    wide = {
        "name": "amp",
        "env": fat,
        "steps": [{"name": f"s{j}", "run": "true", "matrix": matrix} for j in range(4)],
    }
    t0 = time.monotonic()
    answer = core.submit(wide)
    assert isinstance(answer, Rejected) and time.monotonic() - t0 < 5
    assert "(CICD_RAY_MAX_PLANNED_BYTES)" in answer.problems[0]
    big_value = core.submit(
        {"name": "amp", "steps": [{"name": "s", "run": "true"}]}, env={"BIG": "x" * 2**20}
    )
    assert big_value.problems == ["env.BIG: 1048576 bytes is more than the 32768 a value may have"]
    too_much = core.submit(
        {
            "name": "amp",
            "env": {f"V{i}": "x" * 30_000 for i in range(5)},
            "steps": [{"name": "s", "run": "true"}],
        }
    )
    assert "more than the 131072 a step's env may have" in too_much.problems[0]
    as_object = {
        "name": "amp",
        "steps": [{"name": f"s{i}", "run": "x" * 20_000} for i in range(60)],
    }  # 1.2 MB as JSON
    assert len(json.dumps(as_object)) > 2**20
    from cicd_ray.api.runs import _check  # what the API's submit route checks a body with

    [refused] = _check(as_object, {}, 2**20)
    assert "byte limit (CICD_RAY_MAX_PIPELINE_BYTES)" in refused
    assert core.store.list_runs() == []
