"""The pipeline format: what is accepted, how it expands, and how each mistake is reported."""

from __future__ import annotations

import pytest

from cicd_ray.errors import SpecError
from cicd_ray.pipeline.graph import check_env_overrides, plan
from cicd_ray.pipeline.load import load_pipeline, parse_pipeline


def problems_of(doc) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_pipeline(doc)
    return info.value.problems


def test_minimal_pipeline_gets_defaults():
    spec = parse_pipeline("name: hi\nsteps:\n  - {name: a, run: echo hi}\n")
    (step,) = plan(spec)
    assert (step.name, step.pool, step.timeout_s, step.retry_max) == ("a", "default", 600, 0)
    assert step.cpu == 1 and step.memory_mb == 256


def test_matrix_expands_to_variants_with_env_and_needs_mean_all_variants():
    spec = parse_pipeline(
        {
            "name": "m",
            "env": {"G": "g"},
            "steps": [
                {"name": "build", "run": "true"},
                {
                    "name": "test",
                    "run": "true",
                    "needs": ["build"],
                    "matrix": {"py": ["3.10", 3.11], "os": ["linux", True]},
                    "env": {"K": "v"},
                },
                {"name": "ship", "run": "true", "needs": ["test"]},
            ],
        }
    )
    steps = {s.name: s for s in plan(spec)}
    names = list(steps)
    assert names == [
        "build",
        "test[py=3.10,os=linux]",
        "test[py=3.10,os=true]",
        "test[py=3.11,os=linux]",
        "test[py=3.11,os=true]",
        "ship",
    ]
    assert steps["test[py=3.11,os=true]"].env == {
        "G": "g",
        "K": "v",
        "MATRIX_PY": "3.11",
        "MATRIX_OS": "true",
    }
    assert steps["ship"].needs == names[1:5]


def test_a_need_may_name_one_variant():
    spec = parse_pipeline(
        {
            "name": "m",
            "steps": [
                {"name": "t", "run": "true", "matrix": {"py": ["1", "2"]}},
                {"name": "u", "run": "true", "needs": ["t[py=2]"]},
            ],
        }
    )
    assert plan(spec)[-1].needs == ["t[py=2]"]


def test_step_settings_override_defaults():
    spec = parse_pipeline(
        {
            "name": "d",
            "defaults": {
                "timeout": 30,
                "pool": "big",
                "retry": {"max": 1},
                "resources": {"cpu": 2, "memory_mb": 1024},
            },
            "steps": [
                {"name": "a", "run": "true"},
                {
                    "name": "b",
                    "run": "true",
                    "timeout": 5,
                    "pool": "small",
                    "priority": 7,
                    "retry": {"max": 3, "on": ["infra"]},
                    "resources": {"cpu": 0.5},
                },
            ],
        }
    )
    a, b = plan(spec)
    assert (a.timeout_s, a.pool, a.retry_max, a.cpu, a.memory_mb) == (30, "big", 1, 2, 1024)
    assert (b.timeout_s, b.pool, b.retry_max, b.retry_on, b.priority) == (
        5,
        "small",
        3,
        ["infra"],
        7,
    )
    assert (b.cpu, b.memory_mb) == (0.5, 256)


def test_env_overrides_win_and_are_checked():
    spec = parse_pipeline(
        {"name": "e", "env": {"A": "1"}, "steps": [{"name": "s", "run": "true", "env": {"A": "2"}}]}
    )
    assert plan(spec, {"A": "3"})[0].env["A"] == "3"
    assert check_env_overrides({"1BAD": "x", "CICD_X": "y"}) == [
        "env.1BAD: not a valid variable name; use letters, digits and _",
        "env.CICD_X: names starting with CICD_ are reserved",
    ]


@pytest.mark.parametrize(
    "doc, expected",
    [
        (
            {
                "name": "c",
                "steps": [
                    {"name": "a", "run": "x", "needs": ["b"]},
                    {"name": "b", "run": "x", "needs": ["a"]},
                ],
            },
            "steps: the needs form a cycle: a -> b -> a",
        ),
        (
            {"name": "c", "steps": [{"name": "a", "run": "x", "needs": ["a"]}]},
            "steps: the needs form a cycle: a -> a",
        ),
        (
            {"name": "u", "steps": [{"name": "a", "run": "x", "needs": ["nope"]}]},
            "steps[0] (a).needs[0]: unknown step 'nope'; known steps are: a",
        ),
        (
            {"name": "d", "steps": [{"name": "a", "run": "x"}, {"name": "a", "run": "y"}]},
            "steps[1] (a).name: duplicate step name, already used by steps[0]",
        ),
        (
            {"name": "Bad Name", "steps": [{"name": "a", "run": "x"}]},
            "name: 'Bad Name' does not match ^[a-z0-9][a-z0-9._-]{0,62}$",
        ),
        (
            {"name": "n", "steps": [{"name": "-a", "run": "x"}]},
            "steps[0] (-a).name: '-a' does not match ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        ),
        (
            {"name": "k", "steps": [{"name": "a", "run": "x", "tiemout": 5}]},
            "steps[0] (a).tiemout: unknown key; allowed keys are: name, run, needs, matrix, env, "
            "pool, resources, timeout, retry, priority, interruptible, artifacts, cache, "
            "reuse, if, "
            "concurrency, approval, secrets",
        ),
        (
            {"name": "k", "steps": [{"name": "a", "run": "x", "artifacts": ["../etc/passwd"]}]},
            "steps[0] (a).artifacts[0]: '../etc/passwd' must be a relative path inside the "
            "workspace (no leading /, no ..)",
        ),
        (
            {"name": "k", "steps": [{"name": "a", "run": "x", "artifacts": ["/etc/passwd"]}]},
            "steps[0] (a).artifacts[0]: '/etc/passwd' must be a relative path inside the workspace "
            "(no leading /, no ..)",
        ),
        (
            {
                "name": "k",
                "steps": [
                    {
                        "name": "a",
                        "run": "x",
                        "cache": [{"key": "k-${{ secrets.X }}", "paths": ["v"]}],
                    }
                ],
            },
            "steps[0] (a).cache[0].key: 'k-${{ secrets.X }}': unknown expression 'secrets.X'; "
            "a key may use hashFiles('GLOB', ...) and env.NAME",
        ),
        (
            {
                "name": "k",
                "steps": [
                    {"name": "a", "run": "x", "cache": [{"key": "k-${{ env.X", "paths": ["v"]}]}
                ],
            },
            "steps[0] (a).cache[0].key: 'k-${{ env.X': an expression is not closed: write "
            "${{ ... }}",
        ),
        (
            {
                "name": "k",
                "steps": [{"name": "a", "run": "x", "cache": [{"key": "k", "paths": []}]}],
            },
            "steps[0] (a).cache[0].paths: List should have at least 1 item after validation, "
            "not 0, got []",
        ),
        (
            {"name": "k", "stages": [], "steps": [{"name": "a", "run": "x"}]},
            "stages: unknown key; allowed keys are: name, source, env, defaults, concurrency, "
            "notify, steps",
        ),
        (
            {"name": "k", "steps": [{"name": "a", "run": "x", "retry": {"max": 1, "when": "x"}}]},
            "steps[0] (a).retry.when: unknown key; allowed keys are: max, on, infra",
        ),
        (
            {"name": "t", "steps": [{"name": "a", "run": "x", "timeout": "soon"}]},
            "steps[0] (a).timeout: Input should be a valid number, unable to parse string as a "
            "number, got 'soon'",
        ),
        (
            {"name": "t", "steps": [{"name": "a", "run": "x", "env": {"N": 1}}]},
            "steps[0] (a).env.N: Input should be a valid string, got 1 (quote it in YAML)",
        ),
        (
            {"name": "t", "steps": [{"name": "a", "run": "x", "retry": {"on": ["oops"]}}]},
            "steps[0] (a).retry.on[0]: Input should be 'infra', 'failure' or 'timeout', got 'oops'",
        ),
        ({"name": "e", "steps": []}, "steps: must list at least one step"),
        ({"name": "e"}, "steps: required field is missing"),
        (
            {"name": "r", "steps": [{"name": "a"}]},
            "steps[0] (a): needs `run` (a script), `approval`, or both",
        ),
        (
            {"name": "v", "env": {"CICD_RUN_ID": "x"}, "steps": [{"name": "a", "run": "x"}]},
            "env.CICD_RUN_ID: names starting with CICD_ are reserved for cicd-ray; rename it",
        ),
        ("- just\n- a list\n", "(top level): expected a mapping with 'name' and 'steps', got list"),
    ],
)
def test_malformed_pipeline_is_rejected_naming_the_problem(doc, expected):
    assert expected in problems_of(doc)


def test_every_problem_is_reported_at_once():
    problems = problems_of({"name": "X", "steps": [{"name": "a", "run": 5, "bogus": 1}]})
    assert len(problems) == 3
    assert any(p.startswith("name:") for p in problems)
    assert any(p.startswith("steps[0] (a).run:") for p in problems)
    assert any(p.startswith("steps[0] (a).bogus: unknown key") for p in problems)


def test_yaml_syntax_error_and_unreadable_file(tmp_path):
    (tmp_path / "p.yaml").write_text("name: x\nsteps: [\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_pipeline(tmp_path / "p.yaml")
    with pytest.raises(SpecError, match="cannot read"):
        load_pipeline(tmp_path / "missing.yaml")


def test_shipped_pipelines_are_valid():
    for path in ("pipelines/hello.yaml", "pipelines/self-test.yaml"):
        assert plan(load_pipeline(path))


def test_git_source_is_checked():
    spec = parse_pipeline(
        {
            "name": "g",
            "source": {"git": "https://example.org/r.git", "ref": "release/1.2"},
            "steps": [{"name": "a", "run": "true"}],
        }
    )
    assert spec.source.ref == "release/1.2"
    problems = problems_of(
        {
            "name": "g",
            "source": {"git": "ftp://x", "ref": "--upload-pack=x"},
            "steps": [{"name": "a", "run": "true"}],
        }
    )
    assert any(p.startswith("source.git: 'ftp://x' does not match") for p in problems)
    assert any(p.startswith("source.ref: '--upload-pack=x' does not match") for p in problems)


@pytest.mark.parametrize(
    "url, stored",
    [
        ("https://TOKEN@github.com/acme/app.git", "https://github.com/acme/app.git"),
        (
            "https://user:secret@git.example.org:8443/app.git",
            "https://git.example.org:8443/app.git",
        ),
        ("ssh://git:secret@git.example.org/app.git", "ssh://git@git.example.org/app.git"),
        ("ssh://git@git.example.org/app.git", "ssh://git@git.example.org/app.git"),
        ("git@github.com:acme/app.git", "git@github.com:acme/app.git"),
    ],
)
def test_git_credentials_are_never_stored(url, stored):
    spec = parse_pipeline(
        {"name": "g", "source": {"git": url}, "steps": [{"name": "a", "run": "true"}]}
    )
    assert spec.source.git == stored
    dumped = spec.model_dump_json()
    assert ":secret@" not in dumped and "TOKEN" not in dumped


def _one_step(**step) -> dict:
    return {"name": "lim", "steps": [{"name": "a", "run": "true", **step}]}


@pytest.mark.parametrize(
    "step, field",
    [
        ({"matrix": {"x": list(range(16)), "y": list(range(16))}}, None),  # 256 variants
        ({"matrix": {"x": list(range(16)), "y": list(range(16)), "z": [1, 2]}}, "matrix"),
        ({"retry": {"max": 20, "infra": 20}}, None),
        ({"retry": {"max": 21}}, "retry.max"),
        ({"retry": {"infra": 21}}, "retry.infra"),
        ({"priority": 1000}, None),
        ({"priority": -1000}, None),
        ({"priority": 1001}, "priority"),
        ({"priority": -1001}, "priority"),
        ({"timeout": 7 * 24 * 3600}, None),
        ({"timeout": 7 * 24 * 3600 + 1}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"resources": {"cpu": 0.01}}, None),
        ({"resources": {"cpu": 0.009}}, "resources.cpu"),
    ],
    ids=repr,
)
def test_the_documented_limits_hold_at_their_edges(step, field):
    """docs/pipelines.md: at most 256 variants, retry max and infra at most 20, priority
    -1000..1000, a timeout of at most 7 days, cpu at least 0.01."""
    if field is None:
        assert plan(parse_pipeline(_one_step(**step)))
    else:
        problems = problems_of(_one_step(**step))
        assert len(problems) == 1 and problems[0].startswith(f"steps[0] (a).{field}"), problems
