"""Calibration: self-generated tokens (KV cache vs full prefix), Hessian capture, user model factories."""
from __future__ import annotations

import gc
import textwrap
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from golfquant.calib import (CalibConfig, calibration_tokens, capture_hessians, capture_hessians_sequential,
                             generate_tokens, model_logits, sample_next, shard_tokens)
from golfquant.data import write_shard
from golfquant.errors import CheckpointError, DataError, OptionError
from golfquant.factory import build_model, load_model_factory, parse_model_args
from golfquant.model import GPT, CastedLinear, GPTConfig

VOCAB = 64


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, seq_len=24))
    # Random (not zero / tiny) weights so that logits are peaked and every layer matters.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("first_token", ["uniform", "bos"])
def test_kv_cache_generation_equals_full_prefix(temperature, first_token):
    model = tiny_gpt()
    cfg = CalibConfig(seqs=5, batch=2, temperature=temperature, seed=7, first_token=first_token)
    cached = generate_tokens(model, cfg)
    full = generate_tokens(model, cfg, use_cache=False)
    assert cached.shape == (5, 24) and cached.dtype == torch.long
    assert torch.equal(cached, full)
    assert int(cached.min()) >= 0 and int(cached.max()) < VOCAB
    if first_token == "bos":
        assert (cached[:, 0] == cfg.bos_id).all()
    else:
        assert len(set(cached[:, 0].tolist())) > 1


def test_generation_is_seeded():
    model = tiny_gpt()
    a = generate_tokens(model, CalibConfig(seqs=3, seed=1, seq_len=16))
    b = generate_tokens(model, CalibConfig(seqs=3, seed=1, seq_len=16))
    c = generate_tokens(model, CalibConfig(seqs=3, seed=2, seq_len=16))
    assert a.shape == (3, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Sampling at T = 0.8 is not greedy decoding.
    assert not torch.equal(a[:, 1:], generate_tokens(model, CalibConfig(seqs=3, seed=1, seq_len=16,
                                                                        temperature=0.0))[:, 1:])


def test_sampling_follows_temperature():
    logits = torch.tensor([[0.0, 1.0]]).expand(4000, 2)
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    for temperature, p_one in ((1.0, 0.7311), (0.25, 0.9820)):
        frac = sample_next(logits, temperature, u).float().mean().item()
        assert abs(frac - p_one) < 0.02
    assert torch.equal(sample_next(torch.tensor([[0.0, 2.0, 1.0]]), 0.0, u[:1]), torch.tensor([1]))
    # inverse CDF: u below the first token's mass picks it, above picks the next; a zero-mass token is never drawn
    probs_logits = torch.tensor([[0.0, float("-inf"), 0.0]]).expand(2, 3)
    assert sample_next(probs_logits, 1.0, torch.tensor([0.0, 0.49])).tolist() == [0, 0]
    assert sample_next(probs_logits, 1.0, torch.tensor([0.5, 0.999])).tolist() == [2, 2]


def test_tokens_do_not_depend_on_the_batch_split():
    """Each sequence has its own random stream: generating in batches of 1, 2 or all gives the same tokens."""
    model = tiny_gpt()
    runs = [generate_tokens(model, CalibConfig(seqs=4, seq_len=12, batch=b)) for b in (1, 2, 4)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_generation_progress_and_mode_restored():
    model = tiny_gpt().train()
    calls = []
    generate_tokens(model, CalibConfig(seqs=3, batch=2, seq_len=10), progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (30, 30) and len(calls) == 20
    assert model.training


def test_calib_config_rejects_bad_options():
    for kwargs in ({"source": "web"}, {"first_token": "eos"}, {"seqs": 0}, {"temperature": -1.0},
                   {"source": "shards"}, {"seq_len": 0}):
        with pytest.raises(OptionError):
            CalibConfig(**kwargs)


def test_shard_source(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", list(range(50)))
    toks = shard_tokens(str(tmp_path / "fineweb_train_*.bin"), 3, 8)
    assert toks.dtype == torch.long and toks.shape == (3, 8)
    assert torch.equal(toks.flatten(), torch.arange(24))
    cfg = CalibConfig(source="shards", seqs=2, seq_len=5, data_glob=str(tmp_path / "*.bin"))
    assert torch.equal(calibration_tokens(tiny_gpt(), cfg), torch.arange(10).reshape(2, 5))
    with pytest.raises(DataError, match="50 tokens"):
        shard_tokens(str(tmp_path / "*.bin"), 7, 8)


# ---------------------------------------------------------------- Hessians
class Toy(nn.Module):
    """Shared input for c_q/c_k/c_v, a plain nn.Linear, a CastedLinear with bias, a tied head after final_norm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok_emb = nn.Embedding(VOCAB, 16)
        self.c_q, self.c_k, self.c_v = (CastedLinear(16, 16, bias=False) for _ in range(3))
        self.fc = nn.Linear(16, 32)
        self.proj = CastedLinear(32, 16, bias=True)
        self.final_norm = nn.LayerNorm(16, elementwise_affine=False)
        self.acts: dict[str, torch.Tensor] = {}

    def forward_logits(self, idx):
        x = self.tok_emb(idx)
        n = F.rms_norm(x, (16,))
        a = self.c_q(n) * torch.sigmoid(self.c_k(n)) + self.c_v(n)
        h = torch.relu(self.fc(a))
        x = x + self.proj(h)
        out = self.final_norm(x)
        self.acts = {"n": n, "a": a, "h": h, "out": out}
        return out @ self.tok_emb.weight.T


def gram(x: torch.Tensor, tokens: int) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return (x.T @ x / tokens).float()


def test_hessians_equal_hand_computed_gram():
    model = Toy()
    tokens = torch.randint(0, VOCAB, (5, 7), generator=torch.Generator().manual_seed(0))
    hs = capture_hessians(model, tokens, batch=2)
    assert set(hs) == {"c_q.weight", "c_k.weight", "c_v.weight", "fc.weight", "proj.weight", "tok_emb.weight"}
    with torch.no_grad():
        model.forward_logits(tokens)
    want = {"c_q.weight": "n", "fc.weight": "a", "proj.weight": "h", "tok_emb.weight": "out"}
    for key, act in want.items():
        assert hs[key].tokens == 35
        torch.testing.assert_close(hs[key].H, gram(model.acts[act], 35), rtol=1e-5, atol=1e-6)
    assert hs["c_q.weight"] is hs["c_k.weight"] is hs["c_v.weight"]
    assert len({id(h) for h in hs.values()}) == 4
    # Ordinary tensors: a quantizer may damp them in place.
    hs["fc.weight"].H.diagonal().add_(1.0)


def test_hessians_independent_of_batching_and_sequence_split():
    model = tiny_gpt()
    tokens = torch.randint(0, VOCAB, (6, 8), generator=torch.Generator().manual_seed(1))
    a = capture_hessians(model, tokens, batch=1)
    b = capture_hessians(model, tokens, batch=4)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].H, b[k].H, rtol=1e-5, atol=1e-6)


def test_gpt_hessians_shared_qkv_and_embedding_from_final_norm():
    model = tiny_gpt()
    tokens = generate_tokens(model, CalibConfig(seqs=3, seq_len=12))
    hs = capture_hessians(model, tokens, batch=2)
    linear_names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(hs) == linear_names | {"tok_emb.weight"}
    for i in range(2):
        p = f"blocks.{i}."
        assert hs[p + "attn.c_q.weight"] is hs[p + "attn.c_k.weight"] is hs[p + "attn.c_v.weight"]
        assert hs[p + "attn.proj.weight"] is not hs[p + "attn.c_q.weight"]
        assert hs[p + "mlp.proj.weight"].H.shape == (128, 128)
    outs = []
    handle = model.final_norm.register_forward_hook(lambda _m, _a, out: outs.append(out))
    with torch.no_grad():
        model.forward_logits(tokens)
    handle.remove()
    torch.testing.assert_close(hs["tok_emb.weight"].H, gram(outs[0], tokens.numel()), rtol=1e-5, atol=1e-6)
    assert "tok_emb.weight" not in capture_hessians(model, tokens, include_embedding=False)


class WatchedLinear(nn.Linear):
    """Keeps a weak reference to every input it sees, to check that capture retains none."""

    seen: list = []

    def forward(self, x):
        WatchedLinear.seen.append(weakref.ref(x))
        return super().forward(x)


def test_capture_retains_no_activations_or_hooks():
    model = nn.Sequential(nn.Embedding(VOCAB, 8), WatchedLinear(8, 8), nn.ReLU(), WatchedLinear(8, VOCAB))
    WatchedLinear.seen = []
    alive_between_batches = []

    def progress(done, total):
        gc.collect()
        alive_between_batches.append(sum(r() is not None for r in WatchedLinear.seen))

    hs = capture_hessians(model, torch.randint(0, VOCAB, (4, 5)), batch=2, progress=progress)
    assert set(hs) == {"1.weight", "3.weight"}
    gc.collect()
    assert len(WatchedLinear.seen) == 4 and all(r() is None for r in WatchedLinear.seen)
    assert alive_between_batches == [0, 0]
    assert all_hooks(model) == 0


def test_sequential_capture_sees_earlier_blocks_quantized():
    model = tiny_gpt()
    tokens = generate_tokens(model, CalibConfig(seqs=2, seq_len=12))
    plain = capture_hessians(model, tokens)
    names = []

    def round_to_grid(name, w, h):
        names.append(name)
        assert h.H.shape[0] == w.shape[1]
        return torch.round(w * 4) / 4

    quantized = tiny_gpt()
    seq = capture_hessians_sequential(quantized, tokens, round_to_grid)
    assert set(seq) == set(plain) and sorted(names) == sorted(plain)
    # Block 0 sees float inputs; block 1 sees block 0 quantized; every weight ends up on the grid.
    torch.testing.assert_close(seq["blocks.0.mlp.fc.weight"].H, plain["blocks.0.mlp.fc.weight"].H)
    assert not torch.allclose(seq["blocks.1.mlp.fc.weight"].H, plain["blocks.1.mlp.fc.weight"].H)
    ref = tiny_gpt()
    with torch.no_grad():
        for n, m in ref.blocks[0].named_modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.round(m.weight * 4) / 4)
    torch.testing.assert_close(seq["blocks.1.attn.c_q.weight"].H, capture_hessians(ref, tokens)[
        "blocks.1.attn.c_q.weight"].H)
    w = quantized.state_dict()["blocks.1.mlp.proj.weight"]
    assert torch.equal(w, torch.round(w * 4) / 4)
    assert torch.equal(quantized.tok_emb.weight, torch.round(quantized.tok_emb.weight * 4) / 4)
    assert all_hooks(quantized) == 0


def test_model_without_logits_is_rejected():
    class LossOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, idx):
            return self.fc(torch.ones(4)).sum()

    with pytest.raises(OptionError, match="logits"):
        model_logits(LossOnly(), torch.zeros(1, 3, dtype=torch.long))


# ---------------------------------------------------------------- user model factories
USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class TinyLM(nn.Module):
        def __init__(self, vocab, dim, seq_len=10):
            super().__init__()
            self.seq_len = seq_len
            self.embed = nn.Embedding(vocab, dim)
            self.mix = nn.Linear(dim, dim, bias=False)
            self.head = nn.Linear(dim, vocab, bias=False)

        def forward(self, idx):
            x = self.embed(idx).cumsum(1)  # causal: position t sees tokens <= t
            return self.head(torch.tanh(self.mix(x)))

    def make():
        return TinyLM(vocab=32, dim=8)

    NOT_CALLABLE = 3
''')


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(USER_MODEL)
    return path


def test_user_model_loads_generates_and_yields_its_hessians(user_file):
    sd = load_model_factory(f"{user_file}:make")().state_dict()
    model = build_model(sd, model_spec=f"{user_file}:TinyLM", model_args=parse_model_args(["vocab=32", "dim=8"]))
    assert torch.equal(model.state_dict()["mix.weight"], sd["mix.weight"])
    tokens = generate_tokens(model, CalibConfig(seqs=3, batch=2))  # seq_len from the model, full prefix
    assert tokens.shape == (3, 10) and int(tokens.max()) < 32
    hs = capture_hessians(model, tokens)
    assert set(hs) == {"mix.weight", "head.weight"}
    assert hs["mix.weight"].H.shape == (8, 8) and hs["head.weight"].tokens == 30


def test_factory_errors(user_file, tmp_path):
    with pytest.raises(OptionError, match="FILE.py:CALLABLE"):
        load_model_factory(str(user_file))
    with pytest.raises(OptionError, match="not found"):
        load_model_factory(f"{tmp_path / 'nope.py'}:make")
    with pytest.raises(OptionError, match="no callable 'GPT'"):
        load_model_factory(f"{user_file}:GPT")
    with pytest.raises(OptionError, match="no callable 'NOT_CALLABLE'"):
        load_model_factory(f"{user_file}:NOT_CALLABLE")
    with pytest.raises(OptionError, match="--model-args"):
        load_model_factory(f"{user_file}:TinyLM")()
    sd = load_model_factory(f"{user_file}:make")().state_dict()
    with pytest.raises(CheckpointError, match="head.weight"):
        build_model(sd, model_spec=f"{user_file}:TinyLM", model_args={"vocab": 30, "dim": 8})
    with pytest.raises(CheckpointError, match="missing"):
        build_model({k: v for k, v in sd.items() if k != "mix.weight"}, model_spec=f"{user_file}:make")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(OptionError, match="boom"):
        load_model_factory(f"{broken}:x")


def test_parse_model_args():
    assert parse_model_args(None) == {}
    assert parse_model_args('{"vocab": 32, "tie": true}') == {"vocab": 32, "tie": True}
    assert parse_model_args(["dim=8", "name=abc", "xs=[1,2]"]) == {"dim": 8, "name": "abc", "xs": [1, 2]}
    for bad in (["dim"], '{"a": }', "[1, 2]"):
        with pytest.raises(OptionError):
            parse_model_args(bad)


def test_build_model_for_our_gpt():
    src = tiny_gpt(seed=3)
    sd = src.state_dict()
    inferred = build_model(sd)
    from_config = build_model(sd, config_dict=src.config.to_dict())
    idx = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        ref = src.forward_logits(idx)
        torch.testing.assert_close(from_config.forward_logits(idx), ref)
        assert inferred.config.num_heads == 4 and inferred.config.num_kv_heads == 2
    with pytest.raises(CheckpointError):
        build_model({k: v for k, v in sd.items() if k != "blocks.1.mlp.fc.weight"}, config_dict=src.config.to_dict())
