"""Rate-distortion allocation: hull greedy within budget, and `quantize --budget` lands in [(1-0.5%)·B, B]."""
from __future__ import annotations

import itertools
import re

import pytest
import torch

from golfquant.artifact import read_artifact
from golfquant.calib import CalibConfig
from golfquant.errors import OptionError
from golfquant.pipeline import BUDGET_TOLERANCE, QuantizeOptions, quantize_checkpoint
from golfquant.plan import PlanOptions
from golfquant.quant.allocate import Candidate, allocate, measure_candidates, sdclip_candidates, smallest_bytes
from golfquant.quant.clip import ClipSpec
from helpers import tiny_checkpoint

SPEC = ClipSpec("amax")


def cands(points):
    return [Candidate(b, SPEC, float(size), float(err)) for b, (size, err) in enumerate(points, start=2)]


def test_allocate_respects_budget_and_beats_every_feasible_uniform_choice():
    table = {"a": cands([(10, 100), (20, 40), (30, 20), (60, 19)]),
             "b": cands([(5, 50), (15, 45), (40, 5)]),
             "c": cands([(8, 30), (9, 29), (25, 1)])}
    for budget in (23, 40, 60, 75, 100, 200):
        choice = allocate(table, budget)
        used = sum(table[n][i].bytes for n, i in choice.items())
        err = sum(table[n][i].error for n, i in choice.items())
        assert used <= budget
        # exhaustive optimum over all combinations; the hull greedy is within one hull step of it
        best = min(sum(table[n][i].error for n, i in zip(table, combo))
                   for combo in itertools.product(*(range(len(v)) for v in table.values()))
                   if sum(table[n][i].bytes for n, i in zip(table, combo)) <= budget)
        assert err <= best + 20, (budget, err, best)
    assert allocate(table, 22) is None  # smallest: 10 + 5 + 8 = 23
    assert smallest_bytes(table) == 23
    # a scale (real / estimated bytes) applies to every candidate of its tensor
    assert allocate(table, 23, {"a": 2.0}) is None


def test_allocate_takes_the_least_error_point_when_everything_fits():
    table = {"a": cands([(10, 100), (20, 40), (30, 20)]), "b": cands([(5, 50), (40, 5), (50, 6)])}
    assert allocate(table, 10_000) == {"a": 2, "b": 1}  # b's largest candidate is not better: not taken


def test_measured_candidates_trade_bytes_for_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    h = torch.eye(64) * 2.0
    entropy = lambda codes, bits: float(torch.unique(codes).numel())  # noqa: E731  monotone stand-in
    out = measure_candidates(w, h, 1.0, "mlp", sdclip_candidates((2, 4, 8), (0,)), entropy)
    assert [c.bits for c in out] == [2, 4, 8]
    assert out[0].error > out[1].error > out[2].error  # wider codes, smaller error
    no_h = measure_candidates(w, None, 2.0, "mlp", sdclip_candidates((4,), (0,)), entropy)
    assert no_h[0].error == pytest.approx(out[1].error, rel=1e-5)  # H = 2·I == h_default 2 without a Hessian


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "mini.pt", num_layers=1, model_dim=64,
                           vocab_size=256, num_heads=2, num_kv_heads=1)


def budget_opts(budget, **kw):
    kw = {"plan": PlanOptions(float_max_numel=0)} | kw
    return QuantizeOptions(calib=CalibConfig(seqs=2, seq_len=16, batch=2), budget=budget, **kw)


def test_budget_is_met_within_tolerance_or_refused_with_the_smallest_size(mini, tmp_path):
    code = tmp_path / "train_gpt.py"
    code.write_text("x = 1\n" * 200)
    code_bytes = code.stat().st_size
    with pytest.raises(OptionError, match=r"cannot be met: the smallest reachable artifact is [\d,]+ bytes \+ "
                                          rf"{code_bytes:,} code bytes") as e:
        quantize_checkpoint(mini, tmp_path / "x.gqa", budget_opts(5000), code)
    assert not (tmp_path / "x.gqa").exists()
    smallest = int(re.search(r"artifact is ([\d,]+) bytes", str(e.value)).group(1).replace(",", ""))
    for budget in (int((smallest + code_bytes) * 1.02), 16_000, 24_000):
        out = tmp_path / f"{budget}.gqa"
        s = quantize_checkpoint(mini, out, budget_opts(budget), code)
        assert s["total_bytes"] == out.stat().st_size + code_bytes
        assert (1 - BUDGET_TOLERANCE) * budget <= s["total_bytes"] <= budget, (budget, s["total_bytes"])
        assert s["pruned_codes"] >= 0 and all(a["free"] for a in s["allocation"])
        art = read_artifact(out)
        assert art.manifest["meta"]["pruned_codes"] == s["pruned_codes"]


def test_explicit_widths_are_fixed(mini, tmp_path):
    s = quantize_checkpoint(mini, tmp_path / "a.gqa", budget_opts(14_000, fixed_roles=("mlp",),
                            plan=PlanOptions(mlp="int3", float_max_numel=0)))
    assert s["total_bytes"] <= 14_000
    for a in s["allocation"]:
        assert a["free"] == ("mlp" not in a["name"])
        if "mlp" in a["name"]:
            assert a["bits"] == 3
