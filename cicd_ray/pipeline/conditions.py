"""The `if:` language of steps: parsed and checked when a pipeline is validated, evaluated by the
scheduler once a step's needs have ended. Never Python's eval.

    expr    := or
    or      := and ("||" and)*
    and     := unary ("&&" unary)*
    unary   := "!" unary | compare
    compare := operand (("==" | "!=") operand)?
    operand := "(" expr ")" | status "()" | name "." name | 'text' | "text" | true | false

Status functions: `success()` (every need succeeded and the run was not cancelled), `failure()`
(a step this one needs, however indirectly, failed or timed out), `always()`, `cancelled()` (the
run was cancelled). Variables: `env.NAME` (the step's environment; unset is ""), `matrix.KEY`
(a key of the step's matrix), `run.branch`, `run.event`, `run.pipeline`. A condition naming no
status function is read as `success() && (...)`, as in GitHub Actions: it is only considered
once every need succeeded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

MAX_CONDITION_CHARS = 1000
MAX_DEPTH = 32  # nested parentheses and `!`: a hostile condition must not exhaust the stack
STATUS = frozenset({"success", "failure", "always", "cancelled"})
RUN_VARIABLES = frozenset({"branch", "event", "pipeline"})
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_TOKEN = re.compile(
    rf"\s*(?:(?P<op>&&|\|\||==|!=|!|\(|\)|\.)|(?P<name>{_NAME})"
    r"|'(?P<sq>[^']*)'|\"(?P<dq>[^\"]*)\"|(?P<bad>\S))"
)

Type = Literal["bool", "text"]


class ConditionError(ValueError):
    """A condition that cannot be read or checked; `column` counts from 1."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(f"column {column}: {message}")
        self.column = column


@dataclass(frozen=True)
class Node:
    op: str  # "status", "var", "text", "bool", "not", "and", "or", "==", "!="
    args: tuple = ()
    value: str = ""

    @property
    def type(self) -> Type:
        return "text" if self.op in ("var", "text") else "bool"


@dataclass(frozen=True)
class Condition:
    text: str
    tree: Node
    statuses: frozenset[str]  # the status functions it names

    @property
    def waits_for_all(self) -> bool:
        """It names a status function: decided once every need has ended, whatever they did
        (otherwise a need that did not succeed settles it at once)."""
        return bool(self.statuses)


@dataclass(frozen=True)
class Facts:
    """What a condition is evaluated against."""

    success: bool
    failure: bool
    cancelled: bool
    env: dict[str, str]
    matrix: dict[str, str]
    run: dict[str, str]


class _Parser:
    """A recursive-descent parser of the `if:` language, bounded in depth and length: a hostile
    expression is refused, never a stack overflow."""

    def __init__(self, text: str, matrix_keys: frozenset[str] | None) -> None:
        self.text = text
        self.matrix_keys = matrix_keys
        self.tokens = self._lex(text)
        self.i = 0
        self.depth = 0
        self.statuses: set[str] = set()

    @staticmethod
    def _lex(text: str) -> list[tuple[str, str, int]]:
        out: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:  # only blanks are left
                break
            kind = m.lastgroup or ""
            column = m.start(kind) + (0 if kind in ("sq", "dq") else 1)  # at the quote
            if kind == "bad":
                if m.group(kind) in "'\"":
                    raise ConditionError("a quoted text is not closed", column)
                raise ConditionError(f"unexpected {m.group(kind)!r}", column)
            out.append((kind, m.group(kind), column))
            pos = m.end()
        out.append(("end", "", len(text) + 1))
        return out

    def peek(self) -> tuple[str, str, int]:
        return self.tokens[self.i]

    def take(self) -> tuple[str, str, int]:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def expect(self, value: str) -> None:
        kind, got, column = self.take()
        if got != value or kind not in ("op",):
            raise ConditionError(f"expected {value!r}, found {_shown(kind, got)}", column)

    def parse(self) -> Node:
        tree = self.expr()
        kind, got, column = self.peek()
        if kind != "end":
            raise ConditionError(
                f"unexpected {_shown(kind, got)} after a complete condition", column
            )
        return tree

    def expr(self) -> Node:
        return self._chain("||", "or", self.conjunction)

    def conjunction(self) -> Node:
        return self._chain("&&", "and", self.unary)

    def _chain(self, symbol: str, op: str, part) -> Node:
        column = self.peek()[2]
        left = self._boolean(part(), column)
        while self.peek()[1] == symbol and self.peek()[0] == "op":
            self.take()
            column = self.peek()[2]
            left = Node(op, (left, self._boolean(part(), column)))
        return left

    def unary(self) -> Node:
        kind, got, column = self.peek()
        if kind == "op" and got == "!":
            self.take()
            with self._nested(column):
                inner = self.unary()
            return Node("not", (self._boolean(inner, column + 1),))
        return self.compare()

    def compare(self) -> Node:
        left = self.operand()
        kind, got, _ = self.peek()
        if kind == "op" and got in ("==", "!="):
            self.take()
            right_column = self.peek()[2]
            right = self.operand()
            if left.type != right.type:
                raise ConditionError(
                    f"{got} compares a {left.type} with a {right.type}", right_column
                )
            return Node(got, (left, right))
        return left

    def operand(self) -> Node:
        kind, got, column = self.take()
        if kind == "op" and got == "(":
            with self._nested(column):
                inner = self.expr()
            self.expect(")")
            return inner
        if kind in ("sq", "dq"):
            return Node("text", value=got)
        if kind == "name":
            return self._named(got, column)
        raise ConditionError(f"expected a value or a condition, found {_shown(kind, got)}", column)

    def _named(self, name: str, column: int) -> Node:
        if name in ("true", "false"):
            return Node("bool", value=name)
        nxt = self.peek()
        if nxt[1] == "(" and nxt[0] == "op":
            if name not in STATUS:
                raise ConditionError(
                    f"unknown function {name}(); the functions are "
                    + ", ".join(f"{s}()" for s in sorted(STATUS)),
                    column,
                )
            self.take()
            self.expect(")")
            self.statuses.add(name)
            return Node("status", value=name)
        if nxt[1] != "." or nxt[0] != "op":
            raise ConditionError(
                f"unknown name {name!r}; use env.NAME, matrix.KEY, run.branch, "
                "run.event, run.pipeline, a status function or 'text'",
                column,
            )
        self.take()
        kind, field, field_column = self.take()
        if kind != "name":
            raise ConditionError(
                f"expected a name after '{name}.', found {_shown(kind, field)}", field_column
            )
        self._check_variable(name, field, column)
        return Node("var", value=f"{name}.{field}")

    def _check_variable(self, scope: str, field: str, column: int) -> None:
        if scope == "env":
            return
        if scope == "run":
            if field not in RUN_VARIABLES:
                raise ConditionError(
                    f"unknown variable run.{field}; known: "
                    + ", ".join(f"run.{v}" for v in sorted(RUN_VARIABLES)),
                    column,
                )
            return
        if scope == "matrix":
            if self.matrix_keys is not None and field not in self.matrix_keys:
                known = ", ".join(sorted(self.matrix_keys)) or "none: the step has no matrix"
                raise ConditionError(
                    f"unknown variable matrix.{field}; the step's matrix keys are: {known}", column
                )
            return
        raise ConditionError(
            f"unknown variable {scope}.{field}; variables are env.NAME, "
            "matrix.KEY and run.branch, run.event, run.pipeline",
            column,
        )

    def _boolean(self, node: Node, column: int) -> Node:
        if node.type != "bool":
            raise ConditionError(
                "a text is not a condition: compare it (== or !=) with another", column
            )
        return node

    @contextmanager
    def _nested(self, column: int) -> Iterator[None]:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ConditionError(f"nested more than {MAX_DEPTH} deep", column)
        yield
        self.depth -= 1


def _shown(kind: str, value: str) -> str:
    if kind == "end":
        return "the end"
    if kind in ("sq", "dq"):
        return "a quoted text"
    return repr(value)


def parse(text: str, matrix_keys: frozenset[str] | None = None) -> Condition:
    """Read and check a condition; `matrix_keys`: the step's (None: not checked)."""
    if len(text) > MAX_CONDITION_CHARS:
        raise ConditionError(f"longer than {MAX_CONDITION_CHARS} characters", 1)
    if not text.strip():
        raise ConditionError("empty condition; leave `if:` out to run on success", 1)
    parser = _Parser(text, matrix_keys)
    tree = parser.parse()
    return Condition(text, tree, frozenset(parser.statuses))


@lru_cache(maxsize=4096)
def compiled(text: str) -> Condition:
    """A condition already checked at validation, parsed once per master."""
    return parse(text)


def holds(condition: Condition, facts: Facts) -> bool:
    """Evaluate a condition; one naming no status function also needs `success()`."""
    value = _eval(condition.tree, facts)
    return value and facts.success if not condition.statuses else value


def _eval(node: Node, facts: Facts) -> bool:
    # A chain of && or || nests to the left: at most a few hundred deep in 1,000 characters.
    op = node.op
    if op == "or":
        return _eval(node.args[0], facts) or _eval(node.args[1], facts)
    if op == "and":
        return _eval(node.args[0], facts) and _eval(node.args[1], facts)
    if op == "not":
        return not _eval(node.args[0], facts)
    if op == "bool":
        return node.value == "true"
    if op == "status":
        return {
            "success": facts.success,
            "failure": facts.failure,
            "always": True,
            "cancelled": facts.cancelled,
        }[node.value]
    left, right = (_text(a, facts) for a in node.args)
    return (left == right) if op == "==" else (left != right)


def _text(node: Node, facts: Facts) -> str:
    if node.op == "text":
        return node.value
    scope, name = node.value.split(".", 1)
    return {"env": facts.env, "matrix": facts.matrix, "run": facts.run}[scope].get(name, "")
