"""Every YAML example in README.md and docs/ is loaded as a user meets it: a pipeline through
`cicd-ray validate` exactly as written, a pools file through the pools loader."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cicd_ray.config import load_pools
from cicd_ray.yamldoc import load

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
    done = subprocess.run([sys.executable, "-c", "from cicd_ray.cli import main; main()",
                           "validate", str(path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, f"{where}:\n{text}\n{done.stdout}{done.stderr}"
    assert "valid pipeline" in done.stdout


@pytest.mark.parametrize("where, text", [b for b in blocks() if re.search(r"^pools:", b[1], re.M)])
def test_documented_pools_file_loads(where, text, tmp_path):
    path = tmp_path / "pools.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_pools(path), where


@pytest.mark.parametrize("where, text", blocks(), ids=[w for w, _ in blocks()])
def test_every_yaml_block_parses(where, text):
    assert load(text) is not None, where


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_pipeline_validates(path):
    done = subprocess.run([sys.executable, "-c", "from cicd_ray.cli import main; main()",
                           "validate", str(path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
