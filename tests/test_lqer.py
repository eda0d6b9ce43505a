import pytest
import torch

from golfquant.errors import OptionError
from golfquant.quant.clip import parse_clip, row_scales
from golfquant.quant.gptq import gptq_quantize
from golfquant.quant.lqer import apply_lqer, lqer_factors, select_lqer_targets
from golfquant.quant.qtensor import QuantizedTensor


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _structured_error(rows=64, cols=128, seed=0):
    g = _gen(seed)
    low = torch.randn(rows, 4, generator=g) @ torch.randn(4, cols, generator=g)
    return low * 0.05 + torch.randn(rows, cols, generator=g) * 0.02


def _captured(e, approx):
    """Fraction of the error's energy that `approx` removes."""
    return 1.0 - float((e - approx).norm() / e.norm()) ** 2


@pytest.mark.parametrize("rank, a_bits, b_bits, group, floor", [
    (4, 2, 4, 64, 0.7), (2, 2, 4, 64, 0.7), (4, 3, 5, 32, 0.9), (8, 4, 8, 48, 0.95)])
def test_factors_reduce_frobenius_error(rank, a_bits, b_bits, group, floor):
    e = _structured_error()
    f = lqer_factors(e, rank=rank, a_bits=a_bits, b_bits=b_bits, group=group)
    assert f.a_codes.shape == (64, rank) and f.b_codes.shape == (rank, 128)
    assert f.a_scale.shape == () and f.b_scales.shape == (-(-rank * 128 // group),)
    assert f.a_codes.dtype == f.b_codes.dtype == torch.int8
    assert int(f.a_codes.abs().max()) <= 2 ** (a_bits - 1) - 1 and int(f.b_codes.abs().max()) <= 2 ** (b_bits - 1) - 1
    # Against the float rank-r optimum (truncated SVD): the quantized factors keep most of its gain.
    u, s, vh = torch.linalg.svd(e, full_matrices=False)
    optimum = _captured(e, u[:, :rank] * s[:rank] @ vh[:rank])
    assert _captured(e, f.product()) > floor * optimum


def test_apply_lqer_on_gptq_output_and_round_trip():
    g = _gen(1)
    w = torch.randn(64, 128, generator=g) + 0.5 * torch.randn(64, 1, generator=g) @ torch.randn(1, 128, generator=g)
    x = torch.randn(512, 128, generator=g)
    h = x.T @ x / 512
    qt, _ = gptq_quantize(w, h, 3, row_scales(w, 3, parse_clip("mse")))
    fixed = apply_lqer(qt, w)
    assert (w - fixed.dequantize()).norm() < (w - qt.dequantize()).norm()
    # Round trip: rebuilding the tensor from its stored parts dequantizes bit for bit the same.
    f = fixed.lqer
    rebuilt = QuantizedTensor(fixed.codes.clone(), fixed.scales.clone(), 3, type(f)(
        f.a_codes.clone(), f.a_scale.clone(), f.a_bits, f.b_codes.clone(), f.b_scales.clone(), f.b_bits, f.group))
    assert torch.equal(rebuilt.dequantize(), fixed.dequantize())
    assert torch.equal(apply_lqer(fixed, w).dequantize(), fixed.dequantize())  # replaces, never stacks
    with_h = apply_lqer(qt, w, hessian=h)
    assert (w - with_h.dequantize()).norm() < (w - qt.dequantize()).norm()


def test_deterministic():
    e = _structured_error()
    a, b = lqer_factors(e), lqer_factors(e.clone())
    assert torch.equal(a.product(), b.product()) and torch.equal(a.b_scales, b.b_scales)


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(rank=65), dict(a_bits=1), dict(b_bits=9), dict(group=0)])
def test_bad_options(kwargs):
    with pytest.raises(OptionError):
        lqer_factors(_structured_error(), **kwargs)


def test_bank_is_refused():
    with pytest.raises(OptionError):
        lqer_factors(torch.zeros(2, 8, 8))


def test_select_targets():
    errors = {"b": 2.0, "a": 2.0, "c": 5.0, "d": 0.5}
    assert select_lqer_targets(errors, top=3) == ["c", "a", "b"]
    assert select_lqer_targets(errors, top=0) == []
    assert select_lqer_targets(errors, top=10) == ["c", "a", "b", "d"]
    with pytest.raises(OptionError):
        select_lqer_targets(errors, top=-1)


def test_activation_scaling_lowers_the_output_error_and_the_post_pass_passes_the_hessian(monkeypatch):
    """With a Hessian whose diagonal is far from uniform, the activation-scaled SVD keeps the directions that
    matter to the layer's output; the pipeline's --lqer post-pass hands each tensor its Hessian."""
    g = _gen(1)
    e = torch.randn(64, 128, generator=g) * 0.02 + torch.randn(64, 8, generator=g) @ torch.randn(8, 128, generator=g) * 0.01
    x = torch.randn(512, 128, generator=g) * torch.logspace(-1, 1, 128)
    h = x.T @ x / 512
    plain, scaled = lqer_factors(e, rank=4), lqer_factors(e, rank=4, hessian=h)
    out_err = lambda f: float((((e - f.product()) @ h) * (e - f.product())).sum())  # noqa: E731
    assert out_err(scaled) < 0.9 * out_err(plain)

    from golfquant import pipeline
    seen = []
    real = pipeline.apply_lqer
    monkeypatch.setattr(pipeline, "apply_lqer", lambda *a, **k: seen.append(a[-1]) or real(*a, **k))
    qt = QuantizedTensor(torch.zeros(64, 128, dtype=torch.int8), torch.ones(64, dtype=torch.float16), 4)
    pipeline._apply_lqer({"w": qt}, {"w": e}, {"w": pipeline.Hessian(h, 512)}, pipeline.LqerOptions(top=1))
    assert len(seen) == 1 and seen[0] is h
