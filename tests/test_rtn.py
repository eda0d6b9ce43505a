import pytest
import torch

from golfquant.errors import CheckpointError, OptionError
from golfquant.quant.qtensor import qmax
from golfquant.quant.rtn import quantize_rtn


def weights(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_use_the_stored_fp16_scales(bits):
    w = weights(16, 40, seed=bits)
    qt = quantize_rtn(w, bits)
    r = qmax(bits)
    assert qt.codes.dtype == torch.int8 and qt.scales.dtype == torch.float16 and qt.scales.shape == (16,)
    assert int(qt.codes.abs().max()) <= r
    # codes are exactly RTN at the fp16-rounded scale, and amax rows reach +-r
    expect = torch.round(w / qt.scales.float()[:, None]).clamp(-r, r)
    assert torch.equal(qt.codes.float(), expect)
    assert torch.equal(qt.codes.abs().amax(dim=1), torch.full((16,), r, dtype=torch.int8))
    # amax clip: the error of every weight is at most half a step (plus the fp16 rounding of the scale)
    err = (qt.dequantize() - w).abs()
    assert bool((err <= qt.scales.float()[:, None] * (0.5 + 2 * r * 2**-11)).all())


def test_zero_rows_give_zero_codes_and_finite_scales():
    w = weights(4, 32)
    w[1] = 0.0
    w[2] = 1e-12  # below any fp16 scale: no overflow or NaN either
    qt = quantize_rtn(w, 4)
    assert bool(torch.isfinite(qt.scales.float()).all()) and bool((qt.scales.float() > 0).all())
    assert not qt.codes[1].any()
    deq = qt.dequantize()
    assert bool(torch.isfinite(deq).all()) and not deq[1].any()
    assert float((deq[2] - w[2]).abs().max()) < 1e-6


def test_bank_is_quantized_slice_by_slice():
    bank = weights(3, 8, 24, seed=1)
    bank[1] *= 10  # slices with very different ranges keep their own per-row scales
    qt = quantize_rtn(bank, 6)
    assert qt.codes.shape == (3, 8, 24) and qt.scales.shape == (3, 8)
    for s in range(3):
        one = quantize_rtn(bank[s], 6)
        assert torch.equal(qt.codes[s], one.codes) and torch.equal(qt.scales[s], one.scales)


def test_percentile_clip_ignores_an_outlier():
    w = weights(2, 4096, seed=2)
    w[0, 7] = 5.0
    amax = quantize_rtn(w, 8, "amax")
    pct = quantize_rtn(w, 8, "pct:99.9")
    assert float(pct.scales[0]) < float(amax.scales[0]) / 10
    assert int(pct.codes[0, 7]) == 127  # clipped to the top code
    # the rest of the row is represented far better with the clipped scale
    rest = torch.ones(4096, dtype=torch.bool)
    rest[7] = False
    err = lambda qt: float((qt.dequantize()[0, rest] - w[0, rest]).abs().mean())  # noqa: E731
    assert err(pct) < err(amax) / 10


def test_bad_input():
    with pytest.raises(CheckpointError, match="NaN"):
        quantize_rtn(torch.tensor([[1.0, float("nan")]]), 8)
    with pytest.raises(OptionError):
        quantize_rtn(weights(2, 4), 8, "bogus")
    with pytest.raises(ValueError):
        quantize_rtn(weights(4), 8)  # 1-D: not a matrix
    with pytest.raises(ValueError):
        quantize_rtn(weights(2, 4), 9)


def test_bf16_input_and_determinism():
    w = weights(8, 16, seed=3).bfloat16()
    a, b = quantize_rtn(w, 5), quantize_rtn(w.clone(), 5)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
