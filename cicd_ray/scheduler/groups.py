"""Concurrency groups: at most `limit` members of a group active at once (a group is named by
any hashable key: the flow's is (project, name)); the others wait in the order they came (a
run's submission order, then a step's place in its run).

A member is a run (`run_id`) or a step (`run_id/step`). Pure bookkeeping: the facade decides
what admitting or cancelling a member means.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable
from dataclasses import dataclass, field

Order = tuple[int, int]  # (run seq, step index; -1 for a run itself)


@dataclass
class _Group:
    active: list[str] = field(default_factory=list)
    waiting: list[tuple[Order, str, int]] = field(default_factory=list)  # sorted by order


class Groups:
    """Concurrency groups: who holds a place in each, who waits, and who is let in next."""

    def __init__(self) -> None:
        self._groups: dict[Hashable, _Group] = {}

    def hold(self, group: Hashable, member: str) -> None:
        """Take a place already granted (restored from the store), whatever the count."""
        g = self._groups.setdefault(group, _Group())
        if member not in g.active:
            g.active.append(member)

    def ask(self, group: Hashable, member: str, order: Order, limit: int) -> bool:
        """True when `member` is admitted now; otherwise it waits its turn."""
        g = self._groups.setdefault(group, _Group())
        if member in g.active:
            return True
        if not any(m == member for _, m, _ in g.waiting):
            bisect.insort(g.waiting, (order, member, limit))
        return member in self._admit(g)

    def leave(self, group: Hashable, member: str) -> list[str]:
        """`member` ended (or gave up waiting); returns the members admitted in its place."""
        g = self._groups.get(group)
        if g is None:
            return []
        if member in g.active:
            g.active.remove(member)
        g.waiting = [w for w in g.waiting if w[1] != member]
        admitted = self._admit(g)
        if not g.active and not g.waiting:
            del self._groups[group]
        return admitted

    def _admit(self, g: _Group) -> list[str]:
        out = []
        while g.waiting and len(g.active) < g.waiting[0][2]:
            _, member, _ = g.waiting.pop(0)
            g.active.append(member)
            out.append(member)
        return out

    def ahead(self, group: Hashable, member: str) -> int:
        """How many members of the group are before a waiting one (active ones included)."""
        g = self._groups.get(group)
        if g is None:
            return 0
        for i, (_, m, _) in enumerate(g.waiting):
            if m == member:
                return len(g.active) + i
        return 0

    def waiting(self, group: Hashable) -> list[str]:
        g = self._groups.get(group)
        return [m for _, m, _ in g.waiting] if g else []

    def members(self, group: Hashable) -> list[str]:
        """Active and waiting members."""
        g = self._groups.get(group)
        return [*g.active, *(m for _, m, _ in g.waiting)] if g else []
