"""Salient input-column groups at a higher width (golfquant.quant.salient): choice, GPTQ, artifact, every loader,
the CLI and the budget search."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from golfquant import budget
from golfquant.api import quantize_checkpoint
from golfquant.artifact import artifact_sizes, load_artifact, read_artifact, write_artifact
from golfquant.calib import CalibConfig
from golfquant.errors import OptionError
from golfquant.export import artifact_features, loader_source, packed_loader
from golfquant.measure import Candidate, candidate_grid, measure, salient_fits
from golfquant.options import QuantizeOptions
from golfquant.plan import PlanOptions
from golfquant.quant import gptq
from golfquant.quant.clip import parse_clip, round_codes, row_scales
from golfquant.quant.gptq import gptq_quantize, prepare_hessian
from golfquant.quant.lqer import LqerOptions
from golfquant.quant.qtensor import Rotation, qmax
from golfquant.quant.quantize import Quantizer, Setting
from golfquant.quant.salient import SalientOptions, select_groups
from golfquant_cli.main import cli
from golfquant_cli.options import parse_salient
from kernels import PackedWeight, QuantLinear

from helpers import tiny_checkpoint

CLIP = parse_clip("sdclip:8")
TOP1 = SalientOptions(top=1, group=64, bits=8)


def case(seed: int = 0, rows: int = 32, cols: int = 256, loud: slice = slice(64, 128)):
    """w [rows, cols] and H = XᵀX with the activations of `loud` columns 8x the others."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, cols, generator=g)
    x[:, loud] *= 8
    return torch.randn(rows, cols, generator=g) * 0.05, x.T @ x


def test_saliency_follows_activations_not_weights_alone():
    w, h = case()
    w[:, 192:] *= 4  # group 3 has the large weights, group 1 the large activations
    assert int(w.abs().mean(0).reshape(-1, 64).sum(-1).argmax()) == 3  # what a weight-only proxy picks
    assert select_groups(w, h, 64, 1) == (1,)
    assert select_groups(w, torch.eye(256), 64, 1) == (3,)  # equal activations: the weights decide
    assert select_groups(w, h, 64, 2) == (1, 3)  # ascending
    assert select_groups(torch.ones(4, 256), torch.eye(256), 64, 2) == (0, 1)  # ties: the lower index


def _reference_gptq(w, prep, bits, scales, block_size=128):
    """golfquant's GPTQ sweep before salient groups (one width and row-scale vector for every column)."""
    rows, cols = w.shape
    w = w.float().clone()
    w[:, prep.dead] = 0.0
    w = w[:, prep.perm]
    s, r, q = scales.float(), qmax(bits), torch.empty(rows, cols)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, err1, h1 = w[:, i1:i2].clone(), torch.empty(rows, i2 - i1), prep.hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            qj = torch.clamp(torch.round(w1[:, j] / s), -r, r)
            q[:, i1 + j] = qj
            err = (w1[:, j] - qj * s) / h1[j, j]
            w1[:, j + 1:] -= torch.outer(err, h1[j, j + 1:])
            err1[:, j] = err
        w[:, i2:] -= err1 @ prep.hinv[i1:i2, i2:]
    return q[:, torch.argsort(prep.perm)].to(torch.int8)


def test_without_salient_groups_gptq_is_unchanged():
    w, h = case(1)
    scales = row_scales(w, 4, CLIP)
    qt, _ = gptq_quantize(w, h, 4, scales, block_size=64)
    assert qt.salient is None
    assert torch.equal(qt.codes, _reference_gptq(w, prepare_hessian(h)[0], 4, scales, 64))
    off, _ = Quantizer(block_size=64)(w, 4, CLIP, None, h, salient=SalientOptions(top=0))
    assert torch.equal(off.codes, qt.codes) and off.salient is None


def test_gptq_salient_groups_fit_their_width_and_lower_the_error():
    w, h = case()
    plain, plain_stats = Quantizer()(w, 4, CLIP, None, h)
    mixed, stats = Quantizer()(w, 4, CLIP, None, h, salient=TOP1)
    sal = mixed.salient
    assert sal.groups == (1,) and sal.bits == 8 and sal.codes.shape == (32, 64) and sal.scales.shape == (32,)
    assert int(sal.codes.abs().max()) == qmax(8)  # absmax scales: each row reaches the full int8 range
    assert not mixed.codes[:, 64:128].any() and int(mixed.codes.abs().max()) <= qmax(4)
    keep = torch.ones(256, dtype=torch.bool)
    keep[64:128] = False
    assert torch.equal(mixed.scales, row_scales(w[:, keep], 4, CLIP))  # the clip of the other columns alone
    assert stats.hessian_error < 0.5 * plain_stats.hessian_error
    assert stats.hessian_error < stats.rtn_error
    again, _ = Quantizer()(w, 4, CLIP, None, h, salient=TOP1)
    assert torch.equal(again.codes, mixed.codes) and torch.equal(again.salient.codes, sal.codes)


def test_rtn_and_banks():
    w, h = case()
    qt, _ = Quantizer("rtn")(w, 4, CLIP, None, h, salient=TOP1)
    assert torch.equal(qt.salient.codes, round_codes(w[:, 64:128], qt.salient.scales, 8))
    deq = qt.dequantize()
    assert torch.equal(deq[:, 64:128], qt.salient.codes.float() * qt.salient.scales.float()[:, None])
    bank = torch.stack([w, w.flip(0)])
    bq, _ = Quantizer()(bank, 5, CLIP, None, torch.stack([h, h]), salient=SalientOptions(2, 32, 7))
    assert bq.salient.codes.shape == (2, 32, 64) and bq.salient.scales.shape == (2, 32)
    assert bq.salient.groups == (2, 3) and not bq.codes[..., 64:128].any()


@pytest.mark.parametrize("shape, h, opts, message", [
    ((8, 128), None, TOP1, "Hessian"),
    ((8, 96), "eye", TOP1, "multiple"),
    ((8, 64), "eye", TOP1, "leave none"),
    ((8, 128), "eye", SalientOptions(1, 64, 4), "not wider"),
])
def test_unfit_tensors_are_refused_when_asked_explicitly(shape, h, opts, message):
    w = torch.randn(shape)
    with pytest.raises(OptionError, match=message):
        Quantizer()(w, 4, CLIP, None, None if h is None else torch.eye(shape[-1]), salient=opts)


def test_bad_options_are_refused():
    with pytest.raises(OptionError):
        SalientOptions(top=1, group=0)
    with pytest.raises(OptionError, match="drop --salient"):
        QuantizeOptions(budget=10**6, salient=TOP1)
    auto = dataclasses.replace(TOP1, auto=True)
    for wrong in ({}, {"budget": 10**6, "prune_to_budget": True}):
        with pytest.raises(OptionError, match="--salient auto lets --budget"):
            QuantizeOptions(salient=auto, **wrong)
    assert QuantizeOptions(method="rtn", salient=TOP1).needs_hessians


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    w, h = case(rows=48, cols=128, loud=slice(32, 48))
    from golfquant.quant.lqer import apply_lqer
    mixed, _ = Quantizer()(w, 4, CLIP, None, h, salient=SalientOptions(1, 16, 8))
    bank, _ = Quantizer()(torch.randn(3, 8, 32), 5, CLIP, None, torch.diag(torch.arange(1.0, 33.0)),
                          salient=SalientOptions(2, 8, 7))
    tensors = {"fc.weight": apply_lqer(mixed, w, hessian=h), "bank": bank, "plain": mixed.codes.float() * 0.5,
               "mixed.weight": mixed}
    path = tmp_path_factory.mktemp("salient") / "a.gqa"
    write_artifact(path, tensors, None, codecs=["rans", "zlib", "none"])
    return path, tensors


def test_every_loader_gives_the_same_bits(artifact):
    path, tensors = artifact
    want = load_artifact(path)
    for name, value in tensors.items():
        assert torch.equal(want[name], value.dequantize() if hasattr(value, "dequantize") else value), name
    assert artifact_features(path) == {"salient"}
    namespace = {}
    exec(compile(loader_source(True, None, artifact_features(path)), "<exported>", "exec"), namespace)
    exported = namespace["load_artifact"](path)
    packed = read_artifact(path, packed=True).tensors
    for name in want:
        assert torch.equal(exported[name], want[name]), name
        if name != "plain":
            assert torch.equal(packed[name].dequantize(torch.float32, backend="torch"), want[name]), name
    sizes = {t.name: t for t in artifact_sizes(path).tensors}
    assert sizes["fc.weight"].salient_bytes > 0 and sizes["plain"].salient_bytes == 0


def test_loader_pays_for_salient_groups_only_when_used(tmp_path):
    path = tmp_path / "plain.gqa"
    write_artifact(path, {"w": Quantizer("rtn")(torch.randn(4, 8), 4, CLIP, None, None)[0]}, None)
    assert artifact_features(path) == set()
    lean, full = loader_source(True, None, set()), loader_source(True)
    assert "salient" not in loader_source(False, None, set()) and len(lean) < len(full)
    assert loader_source(True, None, {"salient", "rotate"}) == full
    assert packed_loader(None, set()).packed_bytes <= packed_loader().packed_bytes
    with pytest.raises(OptionError):
        loader_source(True, None, {"rotation"})


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "mini.pt", num_layers=2, model_dim=64, vocab_size=256,
                           num_heads=2, num_kv_heads=1)


CALIB_FLAGS = ("--calib-seqs", 2, "--calib-len", 32, "--calib-batch", 2)


@pytest.mark.parametrize("text", ["top", "top=x", "top=1,colour=2", "top=1,top=2", "group=0,top=1", "bits=9,top=1",
                                  "auto=1", "auto,auto", "auto"])
def test_bad_salient_text_is_one_line_and_exit_2(ckpt, tmp_path, text):
    result = invoke("quantize", ckpt, "-o", tmp_path / "never.gqa", "--salient", text)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "salient" in lines[0]
    assert not (tmp_path / "never.gqa").exists()


def test_quantize_with_salient_groups(ckpt, tmp_path):
    out = tmp_path / "s.gqa"
    result = invoke("quantize", ckpt, "-o", out, "--mlp", "int4", "--attn", "int5", "--float-max-numel", 0,
                    "--salient", "top=1,group=64,bits=8", *CALIB_FLAGS, "--json")
    assert result.exit_code == 0, result.output
    art = read_artifact(out)
    got = {t["name"] for t in art.manifest["tensors"] if "salient" in t}
    # the MLP down projections have 128 input columns (2 groups of 64); the rest have 64, and the int8 embedding
    # cannot go wider: --salient applies where it fits
    assert got == {"blocks.0.mlp.proj.weight", "blocks.1.mlp.proj.weight"}
    assert got == set(art.manifest["meta"]["salient"]["tensors"])
    again = tmp_path / "t.gqa"
    assert invoke("quantize", ckpt, "-o", again, "--mlp", "int4", "--attn", "int5", "--float-max-numel", 0,
                  "--salient", "top=1,group=64,bits=8", *CALIB_FLAGS, "--json").exit_code == 0
    assert out.read_bytes() == again.read_bytes()
    result = invoke("quantize", ckpt, "-o", tmp_path / "b.gqa", "--budget", "1e6", "--salient", "top=1")
    assert result.exit_code == 2 and "drop --salient" in result.stderr


@pytest.mark.parametrize("method, lqer", [("rtn", 0), ("gptq", 16)])
def test_salient_groups_in_a_rotated_basis_decode_the_same_everywhere(ckpt, tmp_path, method, lqer):
    # Salient columns are columns of W·R and overwrite the main codes' before LQER and the unrotation: every path
    # (library, exported loader, packed torch/Triton, QuantLinear) must keep that order to agree bit for bit.
    opts = QuantizeOptions(plan=PlanOptions(mlp="int4", attn="int5", float_max_numel=0), method=method,
                           clip="sdclip", calib=CalibConfig(seqs=2, seq_len=32, batch=2), salient=TOP1,
                           rotate="hadamard", lqer=LqerOptions(top=lqer))
    path = tmp_path / "sr.gqa"
    quantize_checkpoint(ckpt, opts).save(path)
    art = read_artifact(path)
    both = [t["name"] for t in art.manifest["tensors"] if "salient" in t and "rotate" in t and (t["lqer"] or not lqer)]
    assert both and artifact_features(path) == {"salient", "rotate"}
    want = load_artifact(path)
    namespace = {}
    exec(compile(loader_source(True, None, artifact_features(path)), "<exported>", "exec"), namespace)
    exported = namespace["load_artifact"](path)
    packed = read_artifact(path, packed=True).tensors
    for name, w in want.items():
        assert torch.equal(exported[name], w), name
        if isinstance(packed[name], PackedWeight):
            for backend in ("torch", "triton"):  # Triton on the CPU interpreter (tests/conftest.py)
                assert torch.equal(packed[name].dequantize(w.dtype, backend), w), (name, backend)
            assert torch.equal(packed[name].dequantize(torch.bfloat16, "torch"),
                               art.tensors[name].dequantize(torch.bfloat16)), name
    x = torch.randn(3, want[both[0]].shape[1])
    assert torch.allclose(QuantLinear(packed[both[0]])(x), x @ want[both[0]].float().T, atol=1e-5)


def test_budget_buys_salient_groups_deterministically(ckpt, tmp_path, monkeypatch):
    auto = parse_salient("auto")
    assert auto == SalientOptions(top=1, group=64, bits=8, auto=True)
    assert not any(c.salient for c in candidate_grid("mlp", 2))  # off unless asked for
    grid = candidate_grid("mlp", 2, salient=auto)
    sal = [c for c in grid if c.salient]
    assert [c.key for c in sal] == [f"{setting} +salient1x64@int8" for setting in (
        "int4 sdclip:default=8.0", "int5 sdclip:default=8.0", "int6 sdclip:default=12.85")]
    assert not any(c.salient for c in candidate_grid("embed", 2, salient=auto) if c.bits == 8)
    assert Candidate.from_json(json.loads(json.dumps(sal[0].to_json()))) == sal[0]
    assert salient_fits(torch.zeros(4, 128), torch.eye(128), auto)
    assert not salient_fits(torch.zeros(4, 64), torch.eye(64), auto)  # one group: none would be left
    assert not salient_fits(torch.zeros(4, 128), None, auto)
    opts = QuantizeOptions(calib=CalibConfig(seqs=2, seq_len=32, batch=2, holdout=128), budget=40000, salient=auto)
    stem = tmp_path / "a"
    first = quantize_checkpoint(ckpt, opts, cache=stem)
    assert quantize_checkpoint(ckpt, opts).data == first.data
    rows = json.loads((tmp_path / "a.measurement.json").read_text())["tensors"]
    assert [r["candidate"]["salient"] for r in rows["blocks.0.mlp.proj.weight"] if r["candidate"]["salient"]] \
        == [[1, 64, 8]] * 3
    assert not any(r["candidate"]["salient"] for r in rows["blocks.0.mlp.fc.weight"])  # 64 columns: 1 group

    # Random weights have no outlier columns to pay for: make salient groups free of damage, so that the allocation
    # buys them, and check that the artifact holds what it chose.
    def free_salient(*args, **kwargs):
        m = measure(*args, **kwargs)
        for rows in m.tensors.values():
            for r in rows:
                r.damage = 0.0 if r.candidate.salient else r.damage
        return m

    monkeypatch.setattr(budget, "measure", free_salient)
    monkeypatch.setattr(budget._Run, "families", lambda self: ["allocated"])  # the uniform plans buy no groups
    chosen = quantize_checkpoint(ckpt, dataclasses.replace(opts, budget=80000))
    chosen.save(tmp_path / "a.gqa")
    art = read_artifact(tmp_path / "a.gqa")
    allocation = art.manifest["meta"]["allocation"]
    assert any("+salient" in setting for setting in allocation.values()), allocation
    for t in art.manifest["tensors"]:  # the plan's choice is what the artifact holds
        assert ("salient" in t) == ("+salient" in allocation.get(t["name"], "")), t["name"]
    assert chosen.total_bytes <= 80000


@pytest.mark.parametrize("rotation", [None, Rotation(64, 0)])
def test_settings_sharing_a_sweep_get_the_codes_of_separate_calls(rotation, monkeypatch):
    # Quantizer.many stacks the settings of one matrix into shared GPTQ sweeps (the budget's measurement); a small
    # batch bound splits them over several sweeps as well.
    monkeypatch.setattr(gptq, "_BATCH_ELEMENTS", 2 * 32 * 256)
    w, h = case(2)
    settings = [Setting(4, CLIP), Setting(3, parse_clip("sdclip:4.24")), Setting(6, parse_clip("sdclip:12.85")),
                Setting(5, CLIP, LqerOptions(rank=4)), Setting(4, CLIP, salient=TOP1)]
    q = Quantizer(block_size=64)
    together = q.many(w, settings, None, h, q.prepare(h, rotation), errors=True, rotation=rotation)
    for st, (qt, stats) in zip(settings, together):
        alone, alone_stats = q(w, st.bits, st.clip, None, h, st.lqer, salient=st.salient, rotation=rotation)
        assert torch.equal(qt.dequantize(), alone.dequantize()) and torch.equal(qt.codes, alone.codes)
        assert stats.hessian_error == alone_stats.hessian_error


def test_an_lqer_candidate_and_its_base_share_one_rounding(monkeypatch):
    # The budget asks for a width with and without its LQER correction together: GPTQ rounds it once.
    w, h = case(2)
    rounded = []
    many = gptq.gptq_quantize_many
    monkeypatch.setattr(gptq, "gptq_quantize_many", lambda w, h, rounds, *a: rounded.append(len(rounds)) or
                        many(w, h, rounds, *a))
    q = Quantizer(block_size=64)
    base, corrected = q.many(w, [Setting(4, CLIP), Setting(4, CLIP, LqerOptions(rank=4))], None, h)
    assert rounded == [1]
    assert torch.equal(base[0].codes, corrected[0].codes) and base[0].lqer is None and corrected[0].lqer is not None
    alone, _ = q(w, 4, CLIP, None, h, LqerOptions(rank=4))
    assert torch.equal(corrected[0].dequantize(), alone.dequantize())
