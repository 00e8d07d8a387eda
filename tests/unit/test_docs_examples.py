"""Every YAML example in README.md and docs/ is loaded as a user meets it: a pipeline through
`cicd-ray validate` exactly as written, a pools file through the pools loader."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cicd_ray.pipeline.yamldoc import load
from cicd_ray.pools import load_pools, load_projects
from cicd_ray.triggers.repositories import load_repos, load_schedules

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "kuberay/README.md"]
BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        for n, match in enumerate(BLOCK.finditer(path.read_text(encoding="utf-8")), 1):
            out.append((f"{path.relative_to(ROOT)}#{n}", match.group(1)))
    return out


def pipelines() -> list[tuple[str, str]]:
    return [(where, text) for where, text in blocks() if re.search(r"^steps:", text, re.M)]


def test_the_docs_hold_pipeline_examples():
    # So the test below cannot pass by finding nothing.
    assert len(pipelines()) >= 3, [w for w, _ in blocks()]


@pytest.mark.parametrize("where, text", pipelines(), ids=[w for w, _ in pipelines()])
def test_documented_pipeline_is_valid_as_written(where, text, tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-c", "from cicd_ray.cli import main; main()", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, f"{where}:\n{text}\n{done.stdout}{done.stderr}"
    assert "valid pipeline" in done.stdout


# A settings file in the docs, by its top key: what reads it as the service does.
SETTINGS_FILES = {
    "pools": load_pools,
    "projects": load_projects,
    "repositories": lambda path: load_schedules(path, load_repos(path)) or load_repos(path),
}
SETTINGS_BLOCKS = [
    (key, where, text)
    for where, text in blocks()
    for key in SETTINGS_FILES
    if re.search(rf"^{key}:", text, re.M)
]


@pytest.mark.parametrize(
    "key, where, text", SETTINGS_BLOCKS, ids=[f"{k}:{w}" for k, w, _ in SETTINGS_BLOCKS]
)
def test_documented_settings_file_loads(key, where, text, tmp_path):
    path = tmp_path / f"{key}.yaml"
    path.write_text(text, encoding="utf-8")
    assert SETTINGS_FILES[key](path), where


def test_the_docs_hold_each_kind_of_settings_file():
    assert {key for key, _, _ in SETTINGS_BLOCKS} == set(SETTINGS_FILES)


@pytest.mark.parametrize("where, text", blocks(), ids=[w for w, _ in blocks()])
def test_every_yaml_block_parses(where, text):
    assert load(text) is not None, where


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipeline_validates(path):
    done = subprocess.run(
        [sys.executable, "-c", "from cicd_ray.cli import main; main()", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def table_keys(path: Path, heading: str) -> list[str]:
    """The first column of the table under a `## heading` of a doc, unquoted."""
    text = path.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)`", section, re.M)]


@pytest.mark.parametrize("heading, model", [("Top level", "PipelineSpec"), ("A step", "StepSpec")])
def test_the_pipeline_reference_lists_every_key(heading, model):
    """docs/pipelines.md's tables name exactly the keys the loader accepts, in its order."""
    from cicd_ray.pipeline import load
    from cicd_ray.pipeline import model as models

    keys = load.keys_of(getattr(models, model))
    assert table_keys(ROOT / "docs/pipelines.md", heading) == keys


def test_the_operations_guide_lists_every_setting():
    """Every CICD_RAY_* variable the code reads is in docs/operations.md, and no other."""
    code = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "cicd_ray").rglob("*.py"))
    read = set(re.findall(r"\bCICD_RAY_[A-Z_]*[A-Z]\b", code))
    guide = (ROOT / "docs/operations.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `(CICD_RAY_[A-Z_]+)`(?:, `(CICD_RAY_[A-Z_]+)`)?", guide, re.M))
    documented = {name for pair in listed for name in pair if name}
    assert read - documented == set(), "read by the code, missing from the guide"
    assert documented - read == set(), "in the guide, read by nothing"


def test_every_shell_block_is_run_by_a_test_or_marked_an_example():
    from tests.docs_shell import EXAMPLES, RUN_HERE, shell_blocks

    found = [(f, line) for f, line, _ in shell_blocks()]
    assert len(found) >= 20, found  # so this cannot pass by finding nothing
    unplaced = [b for b in found if b not in RUN_HERE and b not in EXAMPLES]
    assert unplaced == [], "decide in tests/docs_shell.py: run it in a test, or say why not"
    assert set(RUN_HERE) & set(EXAMPLES) == set()
    assert set(RUN_HERE) | set(EXAMPLES) <= set(found), "entries for blocks no doc has"
    for where in set(RUN_HERE.values()):  # the named tests exist
        path, _, name = where.partition("::")
        assert f"def {name}(" in (ROOT / path).read_text(), where
