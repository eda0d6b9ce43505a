"""Selective ±1 pruning: only ±1 -> 0, cheapest first, fewest codes for the target, never over the budget."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from golfquant.api import quantize_checkpoint
from golfquant.artifact import read_artifact
from golfquant.calib import CalibConfig
from golfquant.codec.rans import encode_codes
from golfquant.codec.sizemodel import ScaledEntropyPricer
from golfquant.errors import OptionError
from golfquant.options import QuantizeOptions
from golfquant.plan import PlanOptions
from golfquant.quant.prune import prune_costs, prune_to_bytes, pruned_floor
from golfquant.quant.rtn import quantize_rtn

from helpers import tiny_checkpoint


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": quantize_rtn(torch.randn(24, 40, generator=g), 4, "sdclip:4"),
            "b": quantize_rtn(torch.randn(2, 8, 40, generator=g) * 3, 3, "sdclip:3")}


def test_costs_are_row_scale_squared_times_h_diag():
    qt = tensors()["a"]
    h_diag = torch.linspace(1, 2, 40)
    idx, cost = prune_costs(qt, h_diag)
    flat = qt.codes.reshape(-1).numpy()
    assert set(np.abs(flat[idx])) == {1} and idx.size == int((np.abs(flat) == 1).sum())
    rows, cols = idx // 40, idx % 40
    expected = qt.scales.double().numpy()[rows] ** 2 * h_diag.double().numpy()[cols]
    np.testing.assert_allclose(cost, expected, rtol=1e-6)
    _, flat_cost = prune_costs(qt, None, 3.0)
    np.testing.assert_allclose(flat_cost, qt.scales.double().numpy()[rows] ** 2 * 3.0, rtol=1e-6)
    bank = tensors()["b"]  # a bank with one diagonal per slice
    idx_b, cost_b = prune_costs(bank, torch.stack([torch.ones(40), 10 * torch.ones(40)]))
    s = bank.scales.double().reshape(-1).numpy()[idx_b // 40] ** 2
    np.testing.assert_allclose(cost_b, s * np.where(idx_b >= 8 * 40, 10.0, 1.0), rtol=1e-6)


def test_prune_to_bytes_zeroes_only_plus_minus_one_and_just_enough():
    ts = tensors()
    costs = {n: prune_costs(qt, None) for n, qt in ts.items()}
    real = {n: len(encode_codes(qt.codes.numpy(), qt.bits)) for n, qt in ts.items()}
    pricers = {n: ScaledEntropyPricer.fit(qt.codes.numpy(), real[n]) for n, qt in ts.items()}  # as budget.py does
    full = sum(real.values())
    floor = pruned_floor(ts, costs, pricers)
    assert floor < full
    target = (full + floor) / 2
    res = prune_to_bytes(ts, costs, pricers, target)
    assert res.estimated_bytes <= target and 0 < res.pruned < res.candidates
    for n, qt in ts.items():
        before, after = qt.codes.numpy(), res.tensors[n].codes.numpy()
        changed = before != after
        assert (np.abs(before[changed]) == 1).all() and (after[changed] == 0).all()
        assert torch.equal(res.tensors[n].scales, qt.scales)
    fewer = prune_to_bytes(ts, costs, pricers, res.estimated_bytes + 1e-9)
    assert fewer.pruned == res.pruned  # the search returns the smallest count that fits
    # the cheapest codes go first: every pruned code costs no more than every kept candidate
    all_costs = np.concatenate([costs[n][1] for n in ts])
    assert np.sort(all_costs)[res.pruned - 1] <= np.sort(all_costs)[res.pruned]
    assert prune_to_bytes(ts, costs, pricers, floor - 1) is None
    assert prune_to_bytes(ts, costs, pricers, full + 1).pruned == 0


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "mini.pt", num_layers=1, model_dim=64,
                           vocab_size=256, num_heads=2, num_kv_heads=1)


def opts(**kw):
    return QuantizeOptions(plan=PlanOptions(mlp="int4", attn="int4", embed="int4", float_max_numel=0),
                           clip="sdclip:4", calib=CalibConfig(seqs=2, seq_len=16, batch=2), **kw)


def test_prune_to_budget_never_exceeds_it(mini, tmp_path):
    plain = quantize_checkpoint(mini, opts())
    plain.save(tmp_path / "plain.gqa")
    before = read_artifact(tmp_path / "plain.gqa").tensors
    for budget in (int(plain.total_bytes * 0.97), int(plain.total_bytes * 0.9)):
        out = tmp_path / f"{budget}.gqa"
        r = quantize_checkpoint(mini, opts(budget=budget, prune_to_budget=True))
        r.save(out)
        assert r.total_bytes == out.stat().st_size <= budget
        assert r.total_bytes >= 0.995 * budget
        after = read_artifact(out).tensors
        changed = 0
        for name, qt in before.items():
            if hasattr(qt, "codes"):
                a, b = qt.codes.numpy(), after[name].codes.numpy()
                diff = a != b
                assert (np.abs(a[diff]) == 1).all() and (b[diff] == 0).all()
                changed += int(diff.sum())
        assert changed == r.budget.pruned_codes > 0
    # the budget meta adds ~100 manifest bytes
    fits = quantize_checkpoint(mini, opts(budget=plain.total_bytes + 200, prune_to_budget=True))
    assert fits.budget.pruned_codes == 0
    with pytest.raises(OptionError, match="cannot be met by pruning"):
        quantize_checkpoint(mini, opts(budget=int(plain.total_bytes * 0.3), prune_to_budget=True))
    with pytest.raises(OptionError, match="needs --budget"):
        opts(prune_to_budget=True)
