import json
import random

import pytest
import torch
from click.testing import CliRunner

from golfquant.checkpoint import load_checkpoint
from golfquant.data import DOC_SEPARATOR, build_dataset
from golfquant.errors import DataError, OptionError
from golfquant.model import GPT, GPTConfig
from golfquant.train import TrainConfig, apply_overrides, export_state_dict, preset, train, zeropower_via_newtonschulz5
from golfquant.train.loop import lr_scale
from golfquant_cli.train_cmd import train as train_command

VOCAB = 320
MICRO_MODEL = dict(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, seq_len=32)
MICRO_TRAIN = dict(steps=12, batch_tokens=256, warmdown_steps=4, muon_momentum_warmup_steps=4, val_every=6,
                   amp="fp32", device="cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Synthetic documents over 16 words -> tokenizer + shards in the challenge's format."""
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran to big red house with small blue car".split()
    docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(60)]
    root = tmp_path_factory.mktemp("synthetic")
    (root / "corpus.txt").write_text(DOC_SEPARATOR.join(docs))
    build_dataset([root / "corpus.txt"], VOCAB, root / "data", val_fraction=0.15)
    return root / "data"


def run(data_dir, out, model_kw=None, train_kw=None, progress=None):
    model = GPTConfig(**{**MICRO_MODEL, **(model_kw or {})})
    cfg = TrainConfig(**{**MICRO_TRAIN, **(train_kw or {})})
    return train(model, cfg, str(data_dir / "fineweb_train_*.bin"), str(data_dir / "fineweb_val_*.bin"),
                 data_dir / "tokenizer.model", out, progress=progress)


def test_training_reduces_loss_and_writes_a_strict_loadable_checkpoint(data_dir, tmp_path):
    events = []
    result = run(data_dir, tmp_path / "m.pt", progress=events.append)
    assert [e.step for e in events] == list(range(1, 13))
    assert events[-1].train_loss < events[0].train_loss - 0.5
    assert events[5].val_bpb is not None and events[0].val_bpb is None
    assert events[-1].lr_scale == pytest.approx(0.25)  # linear warmdown over the last 4 steps

    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt.config == GPTConfig(**MICRO_MODEL).to_dict()
    assert ckpt.extra["val_bpb"] == result.val_bpb and ckpt.extra["steps"] == 12
    model = GPT(GPTConfig.from_dict(ckpt.config))
    model.load_state_dict(ckpt.state_dict, strict=True)
    # baseline dtype layout: tok_emb bf16, CastedLinear and control tensors fp32
    assert ckpt.state_dict["tok_emb.weight"].dtype == torch.bfloat16
    assert ckpt.state_dict["blocks.0.attn.c_q.weight"].dtype == torch.float32
    assert ckpt.state_dict["blocks.0.resid_mix"].dtype == torch.float32
    assert result.val_bpb < events[5].val_bpb  # still learning after the mid-run eval
    assert result.val_loss < 0.6 * torch.log(torch.tensor(VOCAB)).item()  # far below a uniform guess


def test_training_is_deterministic_with_the_seed(data_dir, tmp_path):
    kw = dict(steps=3, val_every=0)
    run(data_dir, tmp_path / "a.pt", train_kw=kw)
    run(data_dir, tmp_path / "b.pt", train_kw=kw)
    run(data_dir, tmp_path / "c.pt", train_kw={**kw, "seed": 7})
    a, b, c = (load_checkpoint(tmp_path / n).state_dict for n in ("a.pt", "b.pt", "c.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.mlp.fc.weight"], c["blocks.0.mlp.fc.weight"])


def test_export_dtypes():
    model = GPT(GPTConfig(**MICRO_MODEL, tie_embeddings=False))
    small = export_state_dict(model, "bfloat16")
    assert {k for k, v in small.items() if v.dtype == torch.bfloat16} == {
        k for k, v in small.items() if v.ndim == 2 and "resid_mix" not in k and "skip_weights" not in k
    }
    assert export_state_dict(model, "baseline")["lm_head.weight"].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in export_state_dict(model, "float32").values())


def test_lr_scale_steps_and_wallclock():
    cfg = TrainConfig(steps=100, warmdown_steps=20)
    assert [lr_scale(s, 0.0, cfg) for s in (0, 80, 90, 99)] == [1.0, 1.0, 0.5, pytest.approx(0.05)]
    timed = TrainConfig(steps=10**6, warmdown_steps=10, max_wallclock_seconds=100.0)
    assert lr_scale(50, 50.0, timed) == 1.0  # 1 s/step: warmdown is the last 10 s
    assert lr_scale(95, 95.0, timed) == pytest.approx(0.5)


def test_newton_schulz_orthogonalizes():
    g = torch.randn(48, 24, generator=torch.Generator().manual_seed(0))
    x = zeropower_via_newtonschulz5(g).float()
    assert x.shape == g.shape
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.5 and s.max() < 1.3  # NS5's quintic maps all singular values into roughly [0.7, 1.2]


def test_overrides_are_typed_and_checked():
    model, cfg = apply_overrides(*preset("tiny"), ["num_layers=2", "tie_embeddings=false", "matrix_lr=0.02"])
    assert (model.num_layers, model.tie_embeddings, cfg.matrix_lr) == (2, False, 0.02)
    with pytest.raises(OptionError, match="expected a int"):
        apply_overrides(model, cfg, ["steps=1.5"])
    with pytest.raises(OptionError, match="key one of"):
        apply_overrides(model, cfg, ["nonsense=1"])
    with pytest.raises(OptionError, match="save_dtype"):
        apply_overrides(model, cfg, ["save_dtype=int4"])


def test_tiny_preset_matrices_exceed_the_small_tensor_limit():
    model, _ = preset("tiny")
    with torch.device("meta"):
        gpt = GPT(model)
    for name, p in gpt.blocks.named_parameters():
        if p.ndim == 2 and "resid_mix" not in name:
            assert p.numel() > 65_536, name


def test_bad_inputs_raise_user_errors(data_dir, tmp_path):
    with pytest.raises(OptionError, match="whole seq_len"):
        run(data_dir, tmp_path / "x.pt", train_kw={"batch_tokens": 100})
    with pytest.raises(DataError, match="no train shard"):
        train(GPTConfig(**MICRO_MODEL), TrainConfig(**MICRO_TRAIN), str(tmp_path / "none_*.bin"),
              str(data_dir / "fineweb_val_*.bin"), data_dir / "tokenizer.model", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_cli_json(data_dir, tmp_path):
    args = ["--data", str(data_dir), "-o", str(tmp_path / "cli.pt"), "--steps", "2", "--json", "--threads", "1"]
    for k, v in {**MICRO_MODEL, "batch_tokens": 128, "val_every": 0, "amp": "fp32", "save_dtype": "bfloat16"}.items():
        args += ["--set", f"{k}={v}"]
    res = CliRunner().invoke(train_command, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["result"]["steps"] == 2 and out["model"]["model_dim"] == 32
    assert load_checkpoint(tmp_path / "cli.pt").state_dict["blocks.1.mlp.fc.weight"].dtype == torch.bfloat16
