import pytest
import torch

from golfquant.errors import DataError
from golfquant.quant.clip import parse_clip, round_codes, row_scales
from golfquant.quant.gptq import ESCALATIONS, gptq_quantize, hessian_weighted_error


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _correlated_hessian(cols, seed=1, tokens=2048):
    g = _gen(seed)
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    x += torch.randn(tokens, cols, generator=g) * torch.linspace(0.2, 2.0, cols)
    return x.T @ x / tokens


@pytest.mark.parametrize("act_order", [True, False])
def test_identity_hessian_gives_rtn_codes(act_order):
    w = torch.randn(64, 128, generator=_gen())
    for bits in (2, 4, 6, 8):
        s = row_scales(w, bits, parse_clip("sdclip:6"))
        qt, stats = gptq_quantize(w, torch.eye(128), bits, s, block_size=32, act_order=act_order)
        assert torch.equal(qt.codes, round_codes(w, s, bits))
        # the sweep's own error sum against a product with H: equal up to fp32 rounding
        assert stats.hessian_error == pytest.approx(stats.rtn_error, rel=1e-5) and stats.escalations == 0


@pytest.mark.parametrize("cols, bits, block", [(64, 4, 128), (128, 4, 32), (200, 3, 64), (96, 6, 128)])
def test_gptq_beats_rtn_on_correlated_hessian(cols, bits, block):
    w = torch.randn(48, cols, generator=_gen(cols))
    h = _correlated_hessian(cols)
    s = row_scales(w, bits, parse_clip("mse"))
    qt, stats = gptq_quantize(w, h, bits, s, block_size=block)
    rtn = round_codes(w, s, bits).float() * s.float()[:, None]
    assert stats.hessian_error == pytest.approx(hessian_weighted_error(w, qt.dequantize(), h))
    assert stats.rtn_error == pytest.approx(hessian_weighted_error(w, rtn, h))
    assert stats.hessian_error < 0.8 * stats.rtn_error
    assert qt.codes.dtype == torch.int8 and int(qt.codes.abs().max()) <= 2 ** (bits - 1) - 1


def test_act_order_and_block_size_do_not_break_the_result():
    w = torch.randn(32, 96, generator=_gen())
    h = _correlated_hessian(96)
    s = row_scales(w, 4, parse_clip("amax"))
    errs = [gptq_quantize(w, h, 4, s, block_size=b, act_order=a)[1].hessian_error
            for a in (True, False) for b in (8, 128)]
    rtn = gptq_quantize(w, h, 4, s)[1].rtn_error
    assert max(errs) < 0.8 * rtn
    # Block size only regroups the same arithmetic: the codes barely move.
    q8 = gptq_quantize(w, h, 4, s, block_size=8)[0].codes
    q128 = gptq_quantize(w, h, 4, s, block_size=128)[0].codes
    assert (q8 != q128).float().mean() < 0.01


def test_deterministic():
    w = torch.randn(32, 64, generator=_gen())
    h = _correlated_hessian(64)
    s = row_scales(w, 4, parse_clip("sdclip:5"))
    assert torch.equal(gptq_quantize(w, h, 4, s)[0].codes, gptq_quantize(w.clone(), h.clone(), 4, s)[0].codes)


def test_dead_column_is_zeroed_without_escalation():
    w = torch.randn(16, 32, generator=_gen())
    h = _correlated_hessian(32)
    h[5, :] = 0.0
    h[:, 5] = 0.0
    s = row_scales(w, 4, parse_clip("amax"))
    qt, stats = gptq_quantize(w, h, 4, s)
    assert torch.equal(qt.codes[:, 5], torch.zeros(16, dtype=torch.int8))
    assert stats.escalations == 0 and stats.damp_used == 0.01


def test_all_zero_hessian():
    w = torch.randn(16, 32, generator=_gen())
    s = row_scales(w, 4, parse_clip("amax"))
    qt, stats = gptq_quantize(w, torch.zeros(32, 32), 4, s)
    assert torch.equal(qt.codes, torch.zeros(16, 32, dtype=torch.int8))  # every column is dead
    assert stats.escalations == 0 and stats.hessian_error == 0.0


def test_duplicated_columns_escalate_damping_when_undamped():
    g = _gen()
    x = torch.randint(-3, 4, (8, 16), generator=g).double()
    x = torch.cat([x, x[:, :8]], dim=1)  # 8 duplicated columns: H is exactly singular
    h = (x.T @ x).float()
    w = torch.randn(16, 24, generator=g)
    s = row_scales(w, 4, parse_clip("amax"))
    qt, stats = gptq_quantize(w, h, 4, s, damp=0.0)
    assert stats.escalations >= 1 and stats.damp_used >= 0.01
    assert stats.hessian_error <= stats.rtn_error
    _, damped = gptq_quantize(w, h, 4, s)  # the default damp handles the same H at once
    assert damped.escalations == 0 and damped.damp_used == 0.01


def test_indefinite_hessian_falls_through_to_the_eigenvalue_shift():
    h = _correlated_hessian(32)
    h[:2, :2] -= 1e7 * torch.eye(2)  # more negative than the largest damping, 10·mean|diag|
    w = torch.randn(8, 32, generator=_gen())
    s = row_scales(w, 4, parse_clip("amax"))
    qt, stats = gptq_quantize(w, h, 4, s)
    assert stats.escalations == ESCALATIONS + 1 and stats.damp_used > 1.0
    assert bool(torch.isfinite(qt.dequantize()).all())


def test_non_finite_hessian_raises_data_error():
    h = _correlated_hessian(16)
    h[2, 3] = float("nan")
    w = torch.randn(4, 16, generator=_gen())
    with pytest.raises(DataError):
        gptq_quantize(w, h, 4, row_scales(w, 4, parse_clip("amax")))


@pytest.mark.parametrize("shared", [True, False])
def test_bank_matches_per_slice(shared):
    w = torch.randn(3, 16, 48, generator=_gen())
    hs = torch.stack([_correlated_hessian(48, seed=i) for i in range(3)])
    h = hs[0] if shared else hs
    s = row_scales(w, 4, parse_clip("sdclip:5"))
    qt, stats = gptq_quantize(w, h, 4, s)
    assert qt.codes.shape == (3, 16, 48) and qt.scales.shape == (3, 16)
    for i in range(3):
        assert torch.equal(qt.codes[i], gptq_quantize(w[i], h if shared else hs[i], 4, s[i])[0].codes)
    assert stats.hessian_error < stats.rtn_error


@pytest.mark.parametrize("dead", [0, 3])
def test_row_errors_from_the_sweep_are_the_hessian_weighted_errors(dead):
    # Σ err² of a row is its (W - Ŵ)(H + damping)(W - Ŵ)ᵀ; less the damping's share, what the budget's damage
    # would otherwise compute with a product by H. Dead columns count in neither.
    w = torch.randn(3, 24, 96, generator=_gen())
    h = _correlated_hessian(96)
    h[:dead] = h[:, :dead] = 0
    for bits in (3, 6):
        qt, stats = gptq_quantize(w, h, bits, row_scales(w, bits, parse_clip("sdclip:8")))
        assert qt.codes.is_contiguous()  # callers view the codes flat
        e = (w - qt.dequantize()).double()
        torch.testing.assert_close(stats.row_errors.double(), ((e @ h.double()) * e).sum(-1), rtol=1e-5, atol=0)
