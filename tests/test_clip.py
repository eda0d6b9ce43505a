import math

import pytest
import torch

from golfquant.codec.entropy import order0_bits
from golfquant.errors import OptionError
from golfquant.quant.clip import (ROLE_KEYS, ClipSpec, entropy_bits, hessian_weighted_error, parse_clip, record_k,
                                  round_codes, row_scales)
from golfquant.quant.qtensor import qmax


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _hessian(cols, seed=1):
    g = _gen(seed)
    x = torch.randn(1024, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    x += torch.randn(1024, cols, generator=g)
    return x.T @ x / 1024


@pytest.mark.parametrize("text, expected", [
    ("amax", ClipSpec("amax")),
    (" pct:99.99984 ", ClipSpec("pct", percentile=99.99984)),
    ("mse", ClipSpec("mse", norm=2.4, grid=100, maxshrink=0.8)),
    ("mse:2", ClipSpec("mse", norm=2.0)),
    ("mse:norm=3,grid=20,maxshrink=0.5", ClipSpec("mse", norm=3.0, grid=20, maxshrink=0.5)),
    ("sdclip:12.85", ClipSpec("sdclip", k=(("default", 12.85),))),
    ("size", ClipSpec("size")),
    ("size:3.5", ClipSpec("size", target_bpw=3.5)),
])
def test_parse_each_method(text, expected):
    assert parse_clip(text) == expected


def test_parse_roles_and_defaults():
    bare = parse_clip("sdclip")
    assert {r: bare.k_for(r, 6) for r in ("mlp", "attn", "other", "control", None)} == {
        "mlp": 12.0, "attn": 13.0, "other": 12.85, "control": 12.85, None: 12.85}
    spec = parse_clip("sdclip:mlp=12,attn=13,embed=15,default=12.85")
    assert dict(spec.k) == {"mlp": 12.0, "attn": 13.0, "embed": 15.0, "default": 12.85}
    assert spec.k_for("embed", 8) == 15.0  # explicit: as given at any width
    only_mlp = parse_clip("sdclip:mlp=11.5")  # other roles keep the record constants
    assert (only_mlp.k_for("mlp", 6), only_mlp.k_for("attn", 6), only_mlp.k_for("embed", 8)) == (11.5, 13.0, 20.0)
    with_default = parse_clip("sdclip:12,mlp=11")  # an explicit default replaces the record constants
    assert [with_default.k_for(r, 8) for r in ("mlp", "attn", "embed")] == [11.0, 12.0, 12.0]
    h = parse_clip("hsdclip:12,0.3")
    assert (h.k_for("attn", 6), h.lam) == (12.0, 0.3)
    assert parse_clip("hsdclip").lam == 0.175
    assert parse_clip("hsdclip:attn=14,lambda=0.2").k_for("attn", 6) == 14.0


def test_record_k_by_role_and_width():
    # The records' own widths give their own k: int8 embeddings 20 (04-05), int7 15 (04-14), int6 matrices.
    assert [record_k("embed", b) for b in (8, 7)] == [20.0, 15.0]
    assert [record_k(r, 6) for r in ("mlp", "attn", "default")] == [12.0, 13.0, 12.85]
    # Other widths: the nearest record width's k times 2^(bits - width), the records' (b, k) ~ (b+1, 2k).
    assert [record_k("embed", b) for b in (6, 4)] == [7.5, 15.0 / 8]
    assert [record_k("mlp", b) for b in (8, 4, 2)] == [48.0, 3.0, 0.75]
    # What a caller records: every role's k at one width, as the clip resolves it.
    bare = parse_clip("sdclip")
    assert bare.k_by_role(8) == {"mlp": 48.0, "attn": 52.0, "embed": 20.0, "other": 51.4, "control": 51.4}
    assert list(parse_clip("hsdclip:mlp=9").k_by_role(6).items()) == [
        ("mlp", 9.0), ("attn", 13.0), ("embed", 7.5), ("other", 12.85), ("control", 12.85)]
    assert list(bare.k_by_role(7)) == list(ROLE_KEYS)
    assert parse_clip("amax").k_by_role(6) == {} and parse_clip("size:3").k_by_role(6) == {}


@pytest.mark.parametrize("text", ["amax", "pct:99.99984", "mse:norm=2,grid=7,maxshrink=0.25", "sdclip",
                                  "sdclip:mlp=11.5", "hsdclip:3,0.1", "size", "size:2.75"])
def test_canonical_text_round_trips(text):
    spec = parse_clip(text)
    assert parse_clip(str(spec)) == spec


@pytest.mark.parametrize("text", [
    "", "foo", "amax:1", "pct", "pct:", "pct:0.9999", "pct:101", "pct:abc", "pct:nan", "mse:0", "mse:grid=1.5",
    "mse:maxshrink=1", "mse:bogus=1", "sdclip:0", "sdclip:-3", "sdclip:mlp=0", "sdclip:mlp=12,13",
    "sdclip:12,13", "sdclip:mlp=1,mlp=2", "sdclip:lambda=0.1", "sdclip:inf", "hsdclip:12,1.5", "hsdclip:12,-0.1",
    "size:0", "size:9", "SDCLIP:12",
])
def test_bad_specs_raise_option_error(text):
    with pytest.raises(OptionError):
        parse_clip(text)


def test_sdclip_scales_are_k_std_over_qmax_fp16():
    w = torch.randn(64, 128, generator=_gen())
    # bare sdclip: the record constants at their widths, scaled by 2^(bits - record width) at others
    for bits, role, k in [(6, "mlp", 12.0), (6, "attn", 13.0), (8, "embed", 20.0), (7, "embed", 15.0),
                          (6, "embed", 7.5), (5, None, 6.425), (4, "mlp", 3.0)]:
        s = row_scales(w, bits, parse_clip("sdclip"), role=role)
        assert s.dtype == torch.float16 and s.shape == (64,)
        assert torch.equal(s, (k * w.std(dim=1) / qmax(bits)).to(torch.float16))
    # an explicit k is used as given, at any width
    s = row_scales(w, 4, parse_clip("sdclip:mlp=12"), role="mlp")
    assert torch.equal(s, (12.0 * w.std(dim=1) / qmax(4)).to(torch.float16))


def test_amax_and_pct():
    w = torch.randn(64, 128, generator=_gen())
    amax = row_scales(w, 6, parse_clip("amax"))
    assert torch.equal(amax, (w.abs().amax(dim=1) / 31).half())
    assert torch.equal(row_scales(w, 6, parse_clip("pct:100")), amax)
    pct = row_scales(w, 8, parse_clip("pct:99"))
    assert torch.equal(pct, (torch.quantile(w.abs(), 0.99, dim=1) / 127).half())


def test_zero_rows_give_zero_codes_never_nan():
    w = torch.randn(8, 32, generator=_gen())
    w[3] = 0.0
    h = _hessian(32)
    for text in ["amax", "pct:99.9", "mse", "sdclip:12", "hsdclip:12,0.5", "size:3"]:
        s = row_scales(w, 4, parse_clip(text), hessian=h)
        assert bool(torch.isfinite(s).all()) and bool((s > 0).all()), text
        assert torch.equal(round_codes(w, s, 4)[3], torch.zeros(32, dtype=torch.int8)), text


def test_mse_beats_amax_on_its_own_norm():
    w = torch.randn(64, 256, generator=_gen())
    w[:, 0] *= 8  # an outlier column makes amax wasteful
    spec = parse_clip("mse:2")
    errs = {}
    for name, s in [("amax", row_scales(w, 4, parse_clip("amax"))), ("mse", row_scales(w, 4, spec))]:
        errs[name] = hessian_weighted_error(w, round_codes(w, s, 4).float() * s.float()[:, None], None)
    assert errs["mse"] < 0.8 * errs["amax"]


def test_hsdclip_scales_follow_row_importance():
    w = torch.randn(32, 64, generator=_gen())
    h = torch.diag(torch.linspace(0.1, 10.0, 64))
    w[5, 32:] *= 3  # heavy weights on the important columns: row 5's importance is highest
    sd = row_scales(w, 6, parse_clip("sdclip:12"))
    hsd = row_scales(w, 6, parse_clip("hsdclip:12,0.5"), hessian=h)
    ratio = hsd.float() / sd.float()
    assert int(ratio.argmax()) == 5
    assert torch.equal(row_scales(w, 6, parse_clip("hsdclip:12,0"), hessian=h), sd)
    with pytest.raises(OptionError):
        row_scales(w, 6, parse_clip("hsdclip"))


@pytest.mark.parametrize("bits, target", [(6, 3.5), (4, 2.2), (8, 4.7)])
def test_size_hits_entropy_target_on_gaussian(bits, target):
    w = torch.randn(64, 256, generator=_gen())
    s = row_scales(w, bits, parse_clip(f"size:{target}"), hessian=_hessian(256))
    e = entropy_bits(round_codes(w, s, bits))
    assert target - 0.03 <= e <= target


def test_size_loose_target_picks_error_optimum_and_needs_a_target():
    w = torch.randn(64, 256, generator=_gen())
    loose = row_scales(w, 4, parse_clip("size:8"))
    best_mse = row_scales(w, 4, parse_clip("mse:norm=2,grid=200,maxshrink=0.9"))
    err = [hessian_weighted_error(w, round_codes(w, s, 4).float() * s.float()[:, None], None)
           for s in (loose, best_mse)]
    assert err[0] < 1.1 * err[1]  # one k for all rows vs a per-row search: close
    with pytest.raises(OptionError):
        row_scales(w, 4, parse_clip("size"))


def test_bank_scales_per_slice():
    w = torch.randn(3, 16, 32, generator=_gen())
    s = row_scales(w, 6, parse_clip("sdclip:10"))
    assert s.shape == (3, 16)
    assert torch.equal(s[1], row_scales(w[1], 6, parse_clip("sdclip:10")))


def test_entropy_bits():
    assert entropy_bits(torch.zeros(10, dtype=torch.int8)) == 0.0
    assert math.isclose(entropy_bits(torch.tensor([-1, 1, -1, 1], dtype=torch.int8)), 1.0)
    assert math.isclose(entropy_bits(torch.arange(-8, 8, dtype=torch.int8)), 4.0)
    assert entropy_bits(torch.empty(0, dtype=torch.int8)) == 0.0
    codes = torch.randint(-31, 32, (40, 50), generator=_gen(), dtype=torch.int8)
    assert entropy_bits(codes) == order0_bits(codes.numpy()) / codes.numel()  # the codec's definition, per code
