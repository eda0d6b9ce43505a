"""--rotate: the Hadamard rotation is orthonormal, the same on every decoding path, and priced by the budget."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from golfquant.api import quantize_checkpoint
from golfquant.artifact import load_artifact, read_artifact
from golfquant.calib import CalibConfig
from golfquant.errors import OptionError
from golfquant.export import artifact_codecs, artifact_features, loader_source
from golfquant.measure import Candidate, candidate_grid
from golfquant.options import QuantizeOptions
from golfquant.plan import PlanOptions
from golfquant.quant.clip import ClipSpec, hessian_weighted_error
from golfquant.quant.lqer import LqerOptions
from golfquant.quant.quantize import Quantizer
from golfquant.quant.rotate import parse_rotate, rotate, rotate_hessian, rotation_for
from golfquant_cli.main import cli
from kernels import PackedWeight, QuantLinear, Rotation, unrotate
from kernels.dequant import fwht, hadamard_signs

from helpers import tiny_checkpoint

CALIB = CalibConfig(seqs=2, seq_len=16, batch=2, holdout=64)


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def spd(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(4 * n, n, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.2, 3, n)
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("block", [2, 8, 32, 64])
def test_rotation_is_orthonormal_and_the_fwht_is_the_hadamard_product(block):
    g = torch.Generator().manual_seed(block)
    w = torch.randn(3, 5, 64, generator=g)
    rot = Rotation(block, 7)
    assert torch.allclose(unrotate(rotate(w, rot), *rot), w, atol=1e-5)
    assert torch.allclose(rotate(unrotate(w, *rot), rot), w, atol=1e-5)
    r = rotate(torch.eye(64, dtype=torch.float64), rot).double()  # the rows of I·R: R itself
    assert torch.allclose(r @ r.T, torch.eye(64, dtype=torch.float64), atol=1e-6)
    h = torch.block_diag(*[sylvester(block)] * (64 // block)) / block ** 0.5
    assert torch.allclose(fwht(w, block).double(), w.double() @ h, atol=1e-5)
    assert torch.allclose(r, torch.diag(hadamard_signs(7, 64).double()) @ h, atol=1e-6)  # R = D·blockdiag(H/√B)


def test_signs_are_deterministic_balanced_and_differ_across_seeds():
    a = hadamard_signs(3, 4096)
    assert torch.equal(a, hadamard_signs(3, 4096)) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(a.mean())) < 0.05
    assert torch.equal(hadamard_signs(3, 100), a[:100])  # a column's sign does not depend on the width
    others = [hadamard_signs(s, 4096) for s in (0, 4, 2**31 - 1)]
    assert all(float((a != o).float().mean()) > 0.4 for o in others)


def test_gptq_error_is_the_same_in_both_bases():
    """GPTQ of W·R against Rᵀ·H·R: the Hessian-weighted error of Ŵ in the original basis, with the original H, is
    the rotated basis' error (R orthonormal); LQER fitted in the rotated basis lowers it."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g) / 8
    w[:, 5] *= 12  # an outlier input column, which the rotation spreads
    h = spd(64)
    rot = Rotation(64, 0)
    clip = ClipSpec("sdclip", k=(("default", 4.0),))
    qt, stats = Quantizer("gptq")(w, 4, clip, "mlp", h, rotation=rot)
    assert qt.rotation == rot
    plain = type(qt)(qt.codes, qt.scales, qt.bits)  # the same codes read in the rotated basis
    original = hessian_weighted_error(w, qt.dequantize(), h)
    rotated = hessian_weighted_error(rotate(w, rot), plain.dequantize(), rotate_hessian(h, rot))
    assert rotated == pytest.approx(original, rel=1e-4) and stats.hessian_error == pytest.approx(original, rel=1e-4)
    unrotated = hessian_weighted_error(w, Quantizer("gptq")(w, 4, clip, "mlp", h)[0].dequantize(), h)
    assert original < unrotated  # on an outlier column the rotation pays
    with_lqer = Quantizer("gptq")(w, 4, clip, "mlp", h, LqerOptions(rank=4), rotation=rot)[0]
    assert torch.equal(with_lqer.codes, qt.codes) and with_lqer.rotation == rot
    assert hessian_weighted_error(w, with_lqer.dequantize(), h) < original


def test_parse_and_options():
    assert parse_rotate("none") == ("none", None) and parse_rotate("Hadamard:64") == ("hadamard", 64)
    for bad in ("hadamard:3", "hadamard:1", "hadamard:x", "givens", "auto:4", "none:2"):
        with pytest.raises(OptionError, match="--rotate"):
            parse_rotate(bad)
    assert rotation_for("hadamard", "w", 96) == Rotation(32, 0) and rotation_for("hadamard", "w", 7) is None
    with pytest.raises(OptionError, match="'blocks.0.w'"):
        rotation_for("hadamard:64", "blocks.0.w", 96)
    assert QuantizeOptions(rotate="HADAMARD:16").rotate == "hadamard:16"
    for kw in ({}, {"budget": 10_000, "prune_to_budget": True}):
        with pytest.raises(OptionError, match="--rotate auto"):
            QuantizeOptions(rotate="auto", **kw)


def test_candidate_grid_rotates_or_twins():
    plain = candidate_grid("mlp", 2)
    rotated = candidate_grid("mlp", 2, rotate=64)
    twins = candidate_grid("mlp", 2, rotate=64, twins=True)
    assert [c.key for c in rotated] == ["fp16"] + [c.key + " +had64" for c in plain[1:]]
    assert twins == plain + rotated[1:] and len({c.key for c in twins}) == len(twins)
    assert all(Candidate.from_json(c.to_json()) == c for c in twins)
    assert rotated[1].rotation == Rotation(64, 0) and plain[1].rotation is None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def exported(path) -> dict:
    namespace = {}
    exec(compile(loader_source(True, artifact_codecs(path), artifact_features(path)), "<loader>", "exec"), namespace)
    return namespace["load_artifact"](path)


@pytest.mark.parametrize("method, rotate", [("rtn", "hadamard"), ("gptq", "hadamard:32")])
def test_every_decoding_path_gives_the_same_bits(ckpt, tmp_path, method, rotate):
    plan = PlanOptions(mlp="int4", attn="int5", embed="int6", float_max_numel=0)
    opts = QuantizeOptions(plan=plan, method=method, clip="sdclip", calib=CALIB, rotate=rotate,
                           lqer=LqerOptions(top=1))
    path = tmp_path / "r.gqa"
    result = quantize_checkpoint(ckpt, opts)
    result.save(path)
    assert quantize_checkpoint(ckpt, opts).data == path.read_bytes()  # deterministic
    art = read_artifact(path)
    quant = [t for t in art.manifest["tensors"] if t["kind"] == "quant"]
    assert quant and all(t["rotate"]["kind"] == "hadamard" and t["shape"][-1] % t["rotate"]["block"] == 0
                         for t in quant)
    assert any(t["lqer"] for t in quant) and art.manifest["meta"]["rotate"] == rotate
    sd = load_artifact(path)
    loader = exported(path)
    packed = read_artifact(path, packed=True).tensors
    for name, want in sd.items():
        assert torch.equal(loader[name], want), name
        value = packed[name]
        if isinstance(value, PackedWeight):
            assert value.rotation is not None
            for backend in ("torch", "triton"):  # Triton on the CPU interpreter (tests/conftest.py)
                assert torch.equal(value.dequantize(want.dtype, backend), want), (name, backend)
            for dtype in (torch.bfloat16, torch.float16):  # the rotation runs in fp32, before the one rounding
                assert torch.equal(value.dequantize(dtype, "torch"), art.tensors[name].dequantize(dtype))
    fc = packed["blocks.0.mlp.fc.weight"]
    x = torch.randn(3, fc.shape[1])
    assert torch.allclose(QuantLinear(fc)(x), x @ sd["blocks.0.mlp.fc.weight"].T, atol=1e-5)


def test_artifacts_without_rotations_pay_no_loader_bytes(ckpt, tmp_path):
    path = tmp_path / "plain.gqa"
    quantize_checkpoint(ckpt, QuantizeOptions(method="rtn", plan=PlanOptions(float_max_numel=0))).save(path)
    assert artifact_features(path) == set() and "rotate" not in read_artifact(path).manifest["meta"]
    codecs = artifact_codecs(path)
    lean, full = loader_source(True, codecs, features=set()), loader_source(True, codecs)
    assert len(lean) < len(full) and "rotate" not in lean and "rotate" in full
    want = load_artifact(path)
    namespace = {}
    exec(lean, namespace)
    got = namespace["load_artifact"](path)
    assert all(torch.equal(got[k], want[k]) for k in want)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("args, message", [
    (["--rotate", "hadamard:3"], "power of two"),
    (["--rotate", "auto"], "--budget"),
    (["--rotate", "hadamard:256", "--float-max-numel", "0"], "columns of '"),
])
def test_bad_rotate_is_one_line_and_exit_2(ckpt, tmp_path, args, message):
    out = tmp_path / "never.gqa"
    result = invoke("quantize", ckpt, "--method", "rtn", "-o", out, *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not out.exists()


def test_budget_with_rotate_auto_reproduces_its_choice(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "mini.pt", num_layers=1, model_dim=64, vocab_size=256, num_heads=2,
                           num_kv_heads=1)
    out = tmp_path / "auto.gqa"
    result = invoke("quantize", ckpt, "-o", out, "--budget", 60_000, "--rotate", "auto", "--method", "rtn",
                    "--no-cache", "--calib-seqs", 2, "--calib-len", 16, "--json")
    assert result.exit_code == 0, result.output
    art = read_artifact(out)
    allocation = art.manifest["meta"]["allocation"]  # also when the first encode already held the final plan
    assert allocation == json.loads(result.stdout)["meta"]["allocation"]
    assert any(" +had" in key for key in allocation.values())  # the twins were measured
    for t in art.manifest["tensors"]:
        key = allocation.get(t["name"], "")
        assert ("rotate" in t) == (" +had" in key), (t["name"], key)
    sd = load_artifact(out)
    loader = exported(out)
    assert all(torch.equal(loader[k], sd[k]) for k in sd)
