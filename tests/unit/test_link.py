"""The API's link to the master (cicd_ray/api/link.py): every call it makes names a method of
the master actor, with the same arguments. Read from the code, since the actor's module needs
Ray and the unit suite does not."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest
from fastapi import HTTPException

from cicd_ray.api.link import MasterLink

ROOT = Path(__file__).resolve().parents[2]


def _methods(path: Path, cls: str) -> dict[str, ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    (found,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    return {n.name: n for n in found.body if isinstance(n, ast.AsyncFunctionDef)}


def test_every_call_the_link_makes_is_a_method_of_the_master_actor():
    actor = _methods(ROOT / "cicd_ray/master/actor/main.py", "Master")
    link = _methods(ROOT / "cicd_ray/api/link.py", "MasterLink")
    calls = {}
    for method in link.values():
        for node in ast.walk(method):
            if (
                isinstance(node, ast.Call)
                and ast.unparse(node.func) == "self._call"
                and isinstance(node.args[0], ast.Constant)
            ):
                calls[node.args[0].value] = len(node.args) - 1
    assert len(calls) >= 15
    for name, given in calls.items():
        assert name in actor, f"the master actor has no method {name!r}"
        params = actor[name].args
        most = len(params.args) - 1  # self
        fewest = most - len(params.defaults)
        assert fewest <= given <= most or params.vararg, (name, given, fewest, most)


def test_a_link_without_a_transport_answers_503():
    with pytest.raises(HTTPException) as e:
        asyncio.run(MasterLink().ping())
    assert e.value.status_code == 503 and "no master" in e.value.detail
