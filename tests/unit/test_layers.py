"""The house: each folder of the package is a part, the parts are in layers, a part imports only
its own folder and the layers below it, Ray only at the edges, and no room grows past what a
reader holds. docs/architecture.md draws the same layers; this test is what keeps them true."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cicd_ray"

# Bottom first. A module may import modules of its own part and of the parts in layers below.
LAYERS = [
    {"errors", "names", "ownership"},
    {"states", "pipeline", "tokens"},
    {"triggers", "secrets", "source", "pools"},
    {"records", "notify"},
    {"config", "protocol"},
    {"scheduler", "store", "follow"},
    {"reads", "worker"},
    {"master"},
    {"api", "client"},
    {"cluster"},
    {"cli", "testing"},
    {"cicd_ray"},  # the package's own __init__ and __main__
]
# The only modules that import Ray: the actors, the Serve wrapper, and the cluster edge.
RAY_EDGES = (
    "cicd_ray.api.serve",
    "cicd_ray.master.actor",
    "cicd_ray.worker.actor",
    "cicd_ray.cluster.",
)
MAX_CLASS_LINES = 250  # counted with the classes it inherits from
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(encoding="utf-8"))
    return found


MODULES = set(modules())


def part_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "cicd_ray"
    return parts[1]


def layer_of(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def imports(tree: ast.Module, typing_too: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in the module, lazy ones in functions included; those
    under `if TYPE_CHECKING:` only with `typing_too`."""
    skip: set[int] = set()
    if not typing_too:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from cicd_ray.api import runs` imports the module cicd_ray.api.runs.
            names = [f"{node.module}.{a.name}" for a in node.names]
            submodules = [n for n in names if n in MODULES]
            found += [(node.lineno, n) for n in submodules]
            if len(submodules) < len(names):
                found.append((node.lineno, node.module))
    return found


def test_every_folder_of_the_package_is_a_part_of_a_layer():
    parts = {part_of(m) for m in modules()}
    placed = set().union(*LAYERS)
    assert parts - placed == set(), "a new part: give it a layer here and in docs/architecture.md"
    assert placed - parts == set()


def test_a_part_imports_only_its_own_folder_and_the_layers_below():
    wrong = []
    for module, tree in modules().items():
        mine = part_of(module)
        for line, target in imports(tree, typing_too=True):
            if not target.startswith("cicd_ray."):
                continue
            theirs = part_of(target)
            if theirs != mine and layer_of(theirs) >= layer_of(mine):
                wrong.append(f"{module}:{line} imports {target} ({mine} -> {theirs})")
    assert wrong == []


def test_no_import_cycle():
    known = modules()
    graph = {m: {t for _, t in imports(tree) if t in known and t != m} for m, tree in known.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n] if n in path else [m, n]
            if n not in state and (cycle := visit(n, [*path, n])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            pytest.fail(" -> ".join(cycle))


def test_ray_is_imported_only_at_the_edges():
    wrong = [
        f"{module}:{line} imports {target}"
        for module, tree in modules().items()
        if not module.startswith(RAY_EDGES)
        for line, target in imports(tree, typing_too=True)
        if target == "ray" or target.startswith("ray.")
    ]
    assert wrong == []


def test_no_class_or_function_outgrows_a_reader():
    classes: dict[str, tuple[str, int, list[str]]] = {}
    long_functions = []
    for module, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
                classes[node.name] = (module, node.end_lineno - node.lineno + 1, bases)
            elif (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            ):
                long_functions.append(f"{module}.{node.name}")

    def size(name: str) -> int:
        _, lines, bases = classes[name]
        return lines + sum(size(b) for b in bases if b in classes)

    big = {f"{classes[n][0]}.{n}": size(n) for n in classes if size(n) > MAX_CLASS_LINES}
    assert big == {}
    assert long_functions == []


def test_every_central_class_says_why_it_is_there():
    """A class of more than 40 lines has a docstring."""
    bare = [
        f"{module}.{node.name}"
        for module, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and node.end_lineno - node.lineno >= 40
        and ast.get_docstring(node) is None
    ]
    assert bare == []


def test_the_public_paths_work():
    """What users and configs name: the package's Client, the Serve import path, the console
    script's entry point, `python -m cicd_ray`."""
    import cicd_ray
    from cicd_ray.client import Client, Run

    assert (cicd_ray.Client, cicd_ray.Run) == (Client, Run)
    assert callable(importlib.import_module("cicd_ray.cli").main)
    done = subprocess.run(
        [sys.executable, "-m", "cicd_ray", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "validate" in done.stdout and "submit" in done.stdout


WITHOUT_RAY = (
    "import sys; sys.modules['ray'] = None; import pytest; sys.exit(pytest.main(sys.argv[1:]))"
)


def test_the_unit_suite_passes_without_ray():
    """`tests/unit` needs no Ray: run it again in a process where `import ray` fails."""
    if os.environ.get("CICD_TEST_NESTED"):
        return  # the nested run itself (this test is its caller)
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, "-q", "-x", "-p", "no:cacheprovider", "tests/unit"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "CICD_TEST_NESTED": "1"},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
