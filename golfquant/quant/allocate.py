"""The budget solver: one option per tensor, least total damage under a byte budget (a multiple-choice knapsack).

Each tensor offers options with `bytes` and `damage` (golfquant.measure: measured once per checkpoint); damages
add across tensors. `allocate` reduces each tensor's options to the lower convex hull of (bytes, damage) and,
from every tensor's smallest option, takes hull steps greedily by damage removed per byte (the Lagrangian
solution at every multiplier), skipping a step that no longer fits and continuing with smaller ones, so the
leftover bytes are used. `fill` starts from a given choice (a uniform plan a user would write) and spends the
leftover the same way over all options, not only the hull's.
"""
from __future__ import annotations

import heapq
from typing import Mapping, Protocol, Sequence


class Option(Protocol):
    bytes: float
    damage: float


Table = Mapping[str, Sequence[Option]]
Choice = dict[str, int]


def total_bytes(table: Table, choice: Mapping[str, int]) -> float:
    return sum(table[n][i].bytes for n, i in choice.items())


def total_damage(table: Table, choice: Mapping[str, int]) -> float:
    return sum(table[n][i].damage for n, i in choice.items())


def smallest(table: Table) -> Choice:
    """Every tensor's smallest option (the first of equal sizes)."""
    return {n: min(range(len(opts)), key=lambda i, o=opts: (o[i].bytes, i)) for n, opts in table.items()}


def _hull(opts: Sequence[Option]) -> list[int]:
    """Indices of the lower convex hull of (bytes, damage), by increasing bytes and decreasing damage."""
    pts = sorted(range(len(opts)), key=lambda i: (opts[i].bytes, opts[i].damage, i))
    hull: list[int] = []
    for i in pts:
        if hull and opts[i].damage >= opts[hull[-1]].damage:
            continue  # not less damage for more bytes
        while len(hull) >= 2:
            a, b, c = opts[hull[-2]], opts[hull[-1]], opts[i]
            # drop b if it lies on or above the segment a-c
            if (b.damage - a.damage) * (c.bytes - a.bytes) >= (c.damage - a.damage) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(table: Table, budget: float) -> Choice | None:
    """{name: index of the chosen option} with total bytes <= budget and least total damage (greedy on the convex
    hulls); None when even the smallest options exceed the budget."""
    hulls = {n: _hull(opts) for n, opts in table.items()}
    pos = {n: 0 for n in table}
    total = sum(table[n][h[0]].bytes for n, h in hulls.items())
    if total > budget:
        return None
    names = list(table)
    heap: list[tuple[float, int]] = []

    def push(t: int) -> None:
        n = names[t]
        h, p = hulls[n], pos[n]
        if p + 1 < len(h):
            a, b = table[n][h[p]], table[n][h[p + 1]]
            heapq.heappush(heap, ((b.damage - a.damage) / (b.bytes - a.bytes), t))

    for t in range(len(names)):
        push(t)
    while heap:
        _, t = heapq.heappop(heap)
        n = names[t]
        h, p = hulls[n], pos[n]
        step = table[n][h[p + 1]].bytes - table[n][h[p]].bytes
        if total + step > budget:
            continue  # this tensor's later steps are less efficient and larger: it stops here
        total += step
        pos[n] = p + 1
        push(t)
    return {n: hulls[n][pos[n]] for n in names}


def fill(table: Table, start: Mapping[str, int], budget: float) -> Choice:
    """`start` with its leftover bytes spent greedily: repeatedly the move of one tensor to an option with less
    damage that removes the most damage per added byte and still fits (ties: table order)."""
    choice = dict(start)
    total = total_bytes(table, choice)
    while True:
        best = None
        for n, opts in table.items():
            cur = opts[choice[n]]
            for i, o in enumerate(opts):
                added = o.bytes - cur.bytes
                gain = cur.damage - o.damage
                if gain <= 0 or total + added > budget:
                    continue
                rate = gain / added if added > 0 else float("inf")
                if best is None or rate > best[0]:
                    best = (rate, n, i, added)
        if best is None:
            return choice
        _, n, i, added = best
        choice[n] = i
        total += added
