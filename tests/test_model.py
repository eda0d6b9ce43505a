import pytest
import torch
import torch.nn.functional as F

from golfquant.errors import CheckpointError, OptionError
from golfquant.model import GPT, GPTConfig, config_from_state_dict, expected_shapes, model_from_state_dict

BASELINE_BLOCK = [  # brief §1.1, in state_dict order
    ("attn_scale", (512,)), ("mlp_scale", (512,)), ("resid_mix", (2, 512)), ("attn.q_gain", (8,)),
    ("attn.c_q.weight", (512, 512)), ("attn.c_k.weight", (256, 512)), ("attn.c_v.weight", (256, 512)),
    ("attn.proj.weight", (512, 512)), ("mlp.fc.weight", (1024, 512)), ("mlp.proj.weight", (512, 1024)),
]


def baseline_table() -> dict[str, tuple[int, ...]]:
    table = {"skip_weights": (4, 512), "tok_emb.weight": (1024, 512)}
    for i in range(9):
        table.update({f"blocks.{i}.{k}": s for k, s in BASELINE_BLOCK})
    return table


def baseline_like_state_dict() -> dict[str, torch.Tensor]:
    """What the challenge's final_model.pt holds: random values, fp32 except a bf16 tok_emb."""
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in baseline_table().items()}
    sd["tok_emb.weight"] = sd["tok_emb.weight"].bfloat16()
    return sd


def micro(**kw) -> GPTConfig:
    base = dict(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, seq_len=24)
    return GPTConfig(**{**base, **kw})


def perturbed(config: GPTConfig, seed: int = 0) -> GPT:
    """A model whose zero-initialized projections are non-zero, so every path affects the logits."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_state_dict_matches_baseline_table_in_order():
    assert list(expected_shapes(GPTConfig()).items()) == list(baseline_table().items())


def test_baseline_param_count():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert sum(p.numel() for p in model.parameters()) == 17_059_912


def test_baseline_state_dict_loads_strict_and_config_is_recovered():
    sd = baseline_like_state_dict()
    config = config_from_state_dict(sd)
    assert config == GPTConfig()
    model = model_from_state_dict(sd)
    assert model.tok_emb.weight.dtype == torch.float32  # bf16 values upcast into the fp32 parameter
    assert torch.equal(model.tok_emb.weight, sd["tok_emb.weight"].float())
    assert torch.equal(model.blocks[8].mlp.proj.weight, sd["blocks.8.mlp.proj.weight"])
    assert "inv_freq" not in " ".join(model.state_dict())


def test_config_from_state_dict_reads_heads_kv_mlp_and_untied_head():
    config = micro(num_heads=8, num_kv_heads=2, mlp_mult=3, tie_embeddings=False)
    sd = GPT(config).state_dict()
    assert list(sd)[-1] == "lm_head.weight"
    assert config_from_state_dict(sd, seq_len=24) == config
    with pytest.raises(CheckpointError, match="num_heads=4"):
        config_from_state_dict(sd, num_heads=4)


def test_config_from_state_dict_rejects_foreign_layouts():
    sd = GPT(micro()).state_dict()
    with pytest.raises(CheckpointError, match="tok_emb.weight"):
        config_from_state_dict({k: v for k, v in sd.items() if k != "tok_emb.weight"})
    with pytest.raises(CheckpointError, match="unexpected"):
        config_from_state_dict({**sd, "bigram.embed.weight": torch.zeros(4, 4)})
    bad = dict(sd)
    bad["blocks.1.attn.c_q.weight"] = torch.zeros(16, 32)
    with pytest.raises(CheckpointError, match="wrong shape"):
        config_from_state_dict(bad)
    bad = dict(sd)
    bad["blocks.0.mlp.fc.weight"] = torch.zeros(40, 32)
    with pytest.raises(CheckpointError, match="MLP multiple"):
        config_from_state_dict(bad)


def test_config_dict_round_trip_and_validation():
    config = micro()
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(CheckpointError, match="unknown keys"):
        GPTConfig.from_dict({**config.to_dict(), "xsa_layers": 4})
    with pytest.raises(CheckpointError, match="divisible"):
        GPTConfig.from_dict({**config.to_dict(), "num_kv_heads": 3})
    with pytest.raises(OptionError, match="even"):
        GPTConfig(model_dim=24, num_heads=8, num_kv_heads=8)


@pytest.mark.parametrize("kw", [{}, {"num_kv_heads": 4}, {"tie_embeddings": False}])
def test_kv_cache_decode_equals_full_forward(kw):
    model = perturbed(micro(**kw))
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.forward_logits(idx)
        # A prefill of 7, single tokens, then a 5-token chunk (exercises the offset causal mask), then singles.
        logits, cache = model.decode(idx[:, :7])
        torch.testing.assert_close(logits, full[:, 6], rtol=0, atol=1e-5)
        for t in range(7, 12):
            logits, cache = model.decode(idx[:, t : t + 1], cache)
            torch.testing.assert_close(logits, full[:, t], rtol=0, atol=1e-5)
        logits, cache = model.decode(idx[:, 12:17], cache)
        torch.testing.assert_close(logits, full[:, 16], rtol=0, atol=1e-5)
        for t in range(17, 20):
            logits, cache = model.decode(idx[:, t : t + 1], cache)
            torch.testing.assert_close(logits, full[:, t], rtol=0, atol=1e-5)
    assert cache.length == 20
    assert full[:, 10].sub(full[:, 11]).abs().max() > 1e-2  # positions really differ, so the check has teeth


def test_decode_beyond_initial_cache_capacity():
    model = perturbed(micro(seq_len=80))
    idx = torch.randint(0, 64, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.forward_logits(idx)
        logits, cache = model.decode(idx[:, :60])
        for t in range(60, 80):  # crosses the 64-slot initial buffer and the RoPE table built for 60
            logits, cache = model.decode(idx[:, t : t + 1], cache)
    torch.testing.assert_close(logits, full[:, -1], rtol=0, atol=1e-5)


def test_forward_is_mean_cross_entropy_of_forward_logits():
    model = perturbed(micro())
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(idx, -1, dims=1)
    with torch.no_grad():
        loss = model(idx, targets)
        ref = F.cross_entropy(model.forward_logits(idx).reshape(-1, 64), targets.reshape(-1))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)


def test_logits_are_softcapped():
    model = perturbed(micro(logit_softcap=5.0))
    with torch.no_grad():
        model.tok_emb.weight.mul_(1000.0)
        logits = model.forward_logits(torch.arange(16)[None])
    assert logits.abs().max() <= 5.0
    assert logits.abs().max() > 4.9  # the cap binds: raw logits are far beyond it


def test_zero_init_projections_make_blocks_identity_at_init():
    torch.manual_seed(0)
    model = GPT(micro())
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
    assert model.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.1)
