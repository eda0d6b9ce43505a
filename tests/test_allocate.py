"""The budget solver: hull greedy within budget, near the exhaustive optimum, and the greedy fill of a start plan."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from golfquant.quant.allocate import allocate, fill, smallest, total_bytes, total_damage


@dataclass
class Opt:
    bytes: float
    damage: float


def table_of(spec):
    return {n: [Opt(float(b), float(d)) for b, d in pts] for n, pts in spec.items()}


TABLE = table_of({"a": [(10, 100), (20, 40), (30, 20), (60, 19)],
                  "b": [(5, 50), (15, 45), (40, 5)],
                  "c": [(8, 30), (9, 29), (25, 1)]})


def exhaustive(table, budget):
    combos = itertools.product(*(range(len(v)) for v in table.values()))
    feasible = [dict(zip(table, c)) for c in combos if total_bytes(table, dict(zip(table, c))) <= budget]
    return min(total_damage(table, c) for c in feasible)


def test_allocate_respects_budget_and_is_within_one_hull_step_of_the_optimum():
    for budget in (23, 40, 60, 75, 100, 200):
        choice = allocate(TABLE, budget)
        assert total_bytes(TABLE, choice) <= budget
        assert total_damage(TABLE, choice) <= exhaustive(TABLE, budget) + 20, budget
    assert allocate(TABLE, 22) is None  # smallest: 10 + 5 + 8 = 23
    assert smallest(TABLE) == {"a": 0, "b": 0, "c": 0}


def test_allocate_takes_the_least_damage_option_when_everything_fits():
    table = table_of({"a": [(10, 100), (20, 40), (30, 20)], "b": [(5, 50), (40, 5), (50, 6)]})
    assert allocate(table, 10_000) == {"a": 2, "b": 1}  # b's largest option is not better: not taken


def test_fill_spends_the_leftover_from_a_start_plan_and_never_exceeds_the_budget():
    start = {"a": 1, "b": 0, "c": 0}  # 33 bytes
    for budget in (33, 34, 50, 80, 200):
        out = fill(TABLE, start, budget)
        assert total_bytes(TABLE, out) <= budget
        assert total_damage(TABLE, out) <= total_damage(TABLE, start)
        assert all(TABLE[n][out[n]].damage <= TABLE[n][start[n]].damage for n in out)  # moves only improve
    assert fill(TABLE, start, 33) == start
    # a: 20 -> 30 bytes removes 20 for 10 (the best rate), then only c: 8 -> 9 still fits in 50
    assert fill(TABLE, start, 50) == {"a": 2, "b": 0, "c": 1}
