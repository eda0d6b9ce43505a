"""The damage `--budget` buys with: second-order KL from Fisher diagonals, checked against measured KL."""
from __future__ import annotations

import contextlib
import textwrap

import numpy as np
import pytest
import torch

from golfquant import sensitivity
from golfquant.api import quantize_checkpoint
from golfquant.calib import CalibConfig, generate_tokens, heldout_tokens
from golfquant.checkpoint import load_checkpoint, save_checkpoint
from golfquant.data import default_data_dir
from golfquant.factory import load_model_factory
from golfquant.measure import RECORD_LQER, Candidate, sdclip, stored_values
from golfquant.options import QuantizeOptions
from golfquant.pipeline import build_float_model, calibrate, hessian_of
from golfquant.quant.clip import ClipSpec
from golfquant.quant.quantize import Quantizer
from golfquant.sensitivity import _head_damage, measure_sensitivity, plan_divergence, reference_logprobs


@pytest.fixture(scope="module")
def bundled():
    torch.manual_seed(0)
    ckpt = load_checkpoint(default_data_dir() / "model.pt")
    opts = QuantizeOptions(calib=CalibConfig(seqs=4, holdout=1024))
    model = build_float_model(ckpt, opts)
    cal = calibrate(ckpt, opts, model=model, heldout=True)
    sens = measure_sensitivity(model, cal.heldout, cal.hessians)
    other = heldout_tokens(model, CalibConfig(holdout=1024, seed=99))  # tokens the signal never saw
    return ckpt, model, cal, sens, other


def test_heldout_tokens_are_not_calibration_tokens(bundled):
    _, model, cal, _, _ = bundled
    calib = CalibConfig(seqs=4, holdout=1024)
    assert cal.heldout.shape == (4, 256)  # 1024 tokens of seq_len 256
    again = heldout_tokens(model, calib)
    assert torch.equal(again, cal.heldout)  # seeded
    assert not any(torch.equal(a, b) for a in generate_tokens(model, calib) for b in cal.heldout)


def test_predicted_damage_ranks_the_measured_kl(bundled):
    ckpt, model, cal, sens, other = bundled
    reference = reference_logprobs(model, other)
    quantize = Quantizer("rtn")
    predicted, measured = [], []
    for name in ("tok_emb.weight", "blocks.0.attn.c_v.weight", "blocks.1.mlp.fc.weight", "blocks.2.attn.c_q.weight",
                 "blocks.3.mlp.proj.weight", "blocks.3.attn.proj.weight"):
        w = ckpt.state_dict[name].float()
        for bits in (3, 5, 7):
            w_hat = quantize(w, bits, ClipSpec("sdclip", k=(("default", 8.0),)), None,
                             hessian_of(cal.hessians, name))[0].dequantize()
            predicted.append(sens.damage(name, w, w_hat))
            measured.append(plan_divergence(model, {name: w_hat}, other, reference).kl)
    p, m = np.array(predicted), np.array(measured)
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert np.corrcoef(rank(p), rank(m))[0, 1] > 0.9
    big = m > 1e-6  # below, float noise and higher orders are as large as the damage itself
    # the second-order estimate is within an order of magnitude of KL itself (its Fisher comes from 1,024 tokens)
    assert big.sum() >= 10 and np.all((m[big] / p[big] > 0.2) & (m[big] / p[big] < 8)), m / p


def test_head_damage_ignores_a_shift_shared_by_all_logits(bundled):
    ckpt, _, _, sens, _ = bundled
    w = ckpt.state_dict["tok_emb.weight"].float()
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(1, w.shape[1], generator=g).expand_as(w) * 0.01  # every logit moves by h·e
    random = torch.randn(w.shape, generator=g)
    random *= shared.norm() / random.norm()
    head = sens.head["tok_emb.weight"]
    assert _head_damage(head, shared) < 0.01 * _head_damage(head, random)


def test_embedding_input_role_counts_only_rows_the_tokens_read(bundled):
    ckpt, _, cal, sens, _ = bundled
    f_in = sens.in_fisher["tok_emb.weight"]
    seen = torch.zeros(f_in.shape[0], dtype=torch.bool)
    seen[cal.heldout[:, :-1].reshape(-1)] = True
    assert bool((f_in[~seen] == 0).all()) and bool((f_in[seen].sum(1) > 0).all())
    assert set(sens.out_fisher) >= {"blocks.0.attn.c_q.weight", "blocks.3.mlp.proj.weight"}


BANKED = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn

    class BankLM(nn.Module):
        """A matrix read with F.linear, as parameter banks are: no module hook sees its input or output."""

        def __init__(self, vocab=64, dim=32, seq_len=16):
            super().__init__()
            self.seq_len = seq_len
            self.embed = nn.Embedding(vocab, dim)
            self.w = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
            self.head = nn.Linear(dim, vocab, bias=False)

        def forward(self, idx):
            x = self.embed(idx).cumsum(1) / torch.arange(1, idx.shape[1] + 1)[:, None]
            return self.head(torch.tanh(F.linear(x, self.w)))
''')


def test_a_matrix_without_a_signal_is_measured_with_forward_passes(tmp_path):
    (tmp_path / "bank.py").write_text(BANKED)
    spec = f"{tmp_path / 'bank.py'}:BankLM"
    torch.manual_seed(0)
    model = load_model_factory(spec)()
    save_checkpoint(tmp_path / "bank.pt", model.state_dict(), None)
    opts = QuantizeOptions(calib=CalibConfig(seqs=4, holdout=64), model_spec=spec, budget=6000)
    cal = calibrate(load_checkpoint(tmp_path / "bank.pt"), opts, model=model, heldout=True)
    sens = measure_sensitivity(model, cal.heldout, cal.hessians)
    assert not sens.has_signal("w") and sens.has_signal("head.weight") and sens.has_signal("embed.weight")
    r = quantize_checkpoint(tmp_path / "bank.pt", opts)
    assert r.total_bytes <= 6000
    assert {a.name for a in r.budget.allocation} == {"embed.weight", "w", "head.weight"}


def test_recomputed_blocks_change_no_signal(bundled, monkeypatch):
    # The backward pass recomputes each block to bound its memory, and starts from the embedding outputs (no
    # weight gradients): what it collects must be what holding every activation collects.
    _, model, cal, sens, _ = bundled
    monkeypatch.setattr(sensitivity, "_checkpointed", lambda _model: contextlib.nullcontext())
    plain = measure_sensitivity(model, cal.heldout, cal.hessians)
    assert set(plain.out_fisher) == set(sens.out_fisher) and set(plain.in_fisher) == set(sens.in_fisher) == {
        "tok_emb.weight"}
    for name, f in [*sens.out_fisher.items(), *sens.in_fisher.items()]:
        torch.testing.assert_close((plain.out_fisher | plain.in_fisher)[name], f, rtol=1e-5, atol=0)
    assert torch.equal(plain.head["tok_emb.weight"].probs, sens.head["tok_emb.weight"].probs)
    assert all(p.grad is None for p in model.parameters())
    model.tok_emb.weight.requires_grad_(False)  # the flags a caller set come back as they were
    measure_sensitivity(model, cal.heldout[:1], cal.hessians)
    assert not model.tok_emb.weight.requires_grad and model.blocks[0].mlp.fc.weight.requires_grad
    model.tok_emb.weight.requires_grad_(True)


def test_the_measurement_takes_damage_from_the_gptq_sweep(bundled):
    # measure.stored_values hands the sweep's row errors to the damage in place of a product with H.
    ckpt, _, cal, sens, _ = bundled
    name = "blocks.0.mlp.fc.weight"
    w, h = ckpt.state_dict[name].float(), hessian_of(cal.hessians, name)
    grid = [Candidate(4, sdclip(8.0)), Candidate(6, sdclip(12.85)), Candidate(3, sdclip(4.243), RECORD_LQER)]
    for cand, (value, row_errors) in zip(grid, stored_values(w, grid, "mlp", h, Quantizer())):
        assert (row_errors is None) == (cand.lqer is not None)
        if row_errors is not None:
            w_hat = value.dequantize()
            assert sens.damage(name, w, w_hat, row_errors) == pytest.approx(sens.damage(name, w, w_hat), rel=1e-5)
