import json
import random

import pytest
import torch
from click.testing import CliRunner
from torch._dynamo.testing import CompileCounterWithBackend

from golfquant.checkpoint import load_checkpoint
from golfquant.data import DOC_SEPARATOR, build_dataset, write_shard
from golfquant.errors import CheckpointError, DataError, OptionError
from golfquant.model import GPT, GPTConfig
from golfquant.quant.clip import parse_clip
from golfquant.quant.rtn import quantize_rtn
from golfquant.train import (TrainConfig, apply_overrides, batch_layout, export_state_dict, preset, train,
                             zeropower_via_newtonschulz5)
from golfquant.train.batches import TokenStream
from golfquant.train.loop import lr_scale, next_step_exceeds_cap, training_fraction
from golfquant.train.qat import attach_qat, fake_quantize, parse_qat, parse_qat_clip, refresh_qat, set_qat
from golfquant_cli.train_cmd import quantize_default_clip, train as train_command

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


def run(data_dir, out, model_kw=None, train_kw=None, progress=None, resume=None):
    model = GPTConfig(**{**MICRO_MODEL, **(model_kw or {})})
    cfg = TrainConfig(**{**MICRO_TRAIN, **(train_kw or {})})
    return train(model, cfg, str(data_dir / "fineweb_train_*.bin"), str(data_dir / "fineweb_val_*.bin"),
                 data_dir / "tokenizer.model", out, progress=progress, resume=resume)


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


# ---------------------------------------------------------------- resume, wallclock, EMA
@pytest.mark.parametrize("extra_kw", [{}, {"ema_decay": 0.9, "qat": "mlp=int4", "qat_start": 0.5,
                                           "save_dtype": "bfloat16"}], ids=["plain", "ema_qat"])
def test_resume_continues_steps_schedule_and_weights_exactly(data_dir, tmp_path, extra_kw):
    kw = dict(steps=6, warmdown_steps=3, muon_momentum_warmup_steps=4, val_every=0, **extra_kw)
    whole, first, second = [], [], []
    run(data_dir, tmp_path / "whole.pt", train_kw=kw, progress=whole.append)
    run(data_dir, tmp_path / "half.pt", train_kw={**kw, "stop_step": 3}, progress=first.append)
    assert load_checkpoint(tmp_path / "half.pt").extra["steps"] == 3
    run(data_dir, tmp_path / "resumed.pt", train_kw=kw, progress=second.append, resume=tmp_path / "half.pt")
    assert [e.step for e in first + second] == [1, 2, 3, 4, 5, 6]
    # fp32 on one CPU process: the resumed run is bit-identical (loss, LR, momentum/QAT schedule, weights)
    trace = [(e.train_loss, e.lr_scale, e.qat) for e in whole]
    assert [(e.train_loss, e.lr_scale, e.qat) for e in first + second] == trace
    assert len({e.lr_scale for e in whole}) > 2  # the warmdown falls inside the resumed half
    if "qat" in extra_kw:
        assert [e.qat for e in whole] == [False, False, False, True, True, True]
    a, b = (load_checkpoint(tmp_path / n).state_dict for n in ("whole.pt", "resumed.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_model_or_finished_run(data_dir, tmp_path):
    run(data_dir, tmp_path / "m.pt", train_kw={"steps": 2, "val_every": 0})
    with pytest.raises(CheckpointError, match="model_dim"):
        run(data_dir, tmp_path / "x.pt", model_kw={"model_dim": 64}, train_kw={"steps": 4}, resume=tmp_path / "m.pt")
    with pytest.raises(OptionError, match="already at step 2"):
        run(data_dir, tmp_path / "x.pt", train_kw={"steps": 2}, resume=tmp_path / "m.pt")
    run(data_dir, tmp_path / "lean.pt", train_kw={"steps": 1, "resumable": False})
    with pytest.raises(CheckpointError, match="no resume state"):
        run(data_dir, tmp_path / "x.pt", train_kw={"steps": 4}, resume=tmp_path / "lean.pt")


def test_wallclock_cap_stops_and_writes_a_loadable_checkpoint(data_dir, tmp_path):
    events = []
    result = run(data_dir, tmp_path / "cap.pt", train_kw={"steps": 100_000, "max_wallclock_seconds": 0.4,
                                                           "val_every": 0}, progress=events.append)
    assert result.stopped_by_wallclock and 1 <= result.steps < 100_000
    assert result.train_seconds <= 0.4 + 2 * result.train_seconds / result.steps  # stopped at the predicted step
    assert events[-1].lr_scale < 1.0  # the time-based warmdown had started
    ckpt = load_checkpoint(tmp_path / "cap.pt")
    GPT(GPTConfig.from_dict(ckpt.config)).load_state_dict(ckpt.state_dict, strict=True)
    assert ckpt.extra["stopped_by_wallclock"] and ckpt.extra["resume"]["train_seconds"] > 0


def test_cap_and_fraction_rules():
    cfg = TrainConfig(steps=100, max_wallclock_seconds=10.0)
    assert not next_step_exceeds_cap(0, 0.0, cfg)  # no estimate before the first step
    assert not next_step_exceeds_cap(4, 8.0, cfg)  # 2 s/step: 8 + 2 = 10 is still within the cap
    assert next_step_exceeds_cap(5, 9.0, cfg)  # 9 + 1.8 > 10
    assert not next_step_exceeds_cap(10**6, 10**6, TrainConfig())  # no cap
    assert training_fraction(50, 9.0, cfg) == pytest.approx(0.9)  # the clock leads
    assert training_fraction(50, 1.0, cfg) == pytest.approx(0.5)  # the step count leads


def test_ema_checkpoint_holds_the_average(data_dir, tmp_path):
    run(data_dir, tmp_path / "ema.pt", train_kw={"steps": 1, "ema_decay": 0.25, "val_every": 0,
                                                 "save_dtype": "float32"})
    ckpt = load_checkpoint(tmp_path / "ema.pt")
    torch.manual_seed(TrainConfig().seed)  # the run's seed: its initial weights
    init = GPT(GPTConfig(**MICRO_MODEL)).state_dict()
    live = ckpt.extra["resume"]["params"]
    for name, saved in ckpt.state_dict.items():
        torch.testing.assert_close(saved, 0.25 * init[name] + 0.75 * live[name])
    # step 1 moves only what has a gradient through the zero-initialised projections: mlp.proj does
    assert not torch.equal(ckpt.state_dict["blocks.0.mlp.proj.weight"], live["blocks.0.mlp.proj.weight"])


# ---------------------------------------------------------------- data loader
def test_ranks_never_share_a_window_and_the_stream_stays_consecutive(tmp_path):
    # token value = position in the stream (two shards, 1700 tokens, then it wraps): each window names its span
    write_shard(tmp_path / "fineweb_train_000000.bin", list(range(1000)))
    write_shard(tmp_path / "fineweb_train_000001.bin", list(range(1000, 1700)))
    pattern, world, window_tokens, seq = str(tmp_path / "fineweb_train_*.bin"), 3, 64, 16
    layout = batch_layout(2 * world * window_tokens, 2 * world, seq, world)  # 2 whole micro-batches per rank
    assert (layout.micro_steps, layout.micro_seqs) == (2, window_tokens // seq)
    span = window_tokens + 1
    streams = [TokenStream(pattern, 65536) for _ in range(world)]
    for step in range(6):  # 6 x 6 x 65 tokens: wraps past both shards
        windows = []
        for rank, stream in enumerate(streams):
            for micro, (x, y) in enumerate(stream.step(layout, rank)):
                # the baseline's layout: in micro-step k rank r takes the window k * world + r of the step
                start = ((step * 2 + micro) * world + rank) * span
                expected = torch.tensor([(start + i) % 1700 for i in range(span)])
                assert torch.equal(x.flatten(), expected[:-1]) and torch.equal(y.flatten(), expected[1:])
                assert x.shape == (window_tokens // seq, seq)
                windows.append(set(expected.tolist()))
        assert all(not windows[a] & windows[b] for a in range(len(windows)) for b in range(a + 1, len(windows)))
        assert len({s.pos for s in streams}) == 1  # every rank's stream stays where one process's would be


@pytest.mark.parametrize("windows,window_seqs,world", [
    (1, 16, 1), (1, 16, 2), (1, 16, 16),  # the tiny preset: its one micro-batch split over the ranks
    (8, 4, 1), (8, 4, 2), (8, 4, 8), (8, 4, 16),  # the baseline's 8: whole micro-batches, then halves
    (2, 3, 3), (8, 3, 3), (2, 4, 8),  # neither divides the other
])
def test_every_world_size_runs_the_same_global_batch(tmp_path, windows, window_seqs, world):
    seq = 4
    write_shard(tmp_path / "fineweb_train_000000.bin", list(range(5000)))
    pattern = str(tmp_path / "fineweb_train_*.bin")
    one = batch_layout(windows * window_seqs * seq, windows, seq, 1)
    layout = batch_layout(one.batch_tokens, windows, seq, world)
    reference = TokenStream(pattern, 65536).step(one)
    assert len(reference) == windows  # one process runs the configured micro-batches as they are
    ranks = [TokenStream(pattern, 65536).step(layout, rank) for rank in range(world)]
    # every rank the same number of micro-batches of the same size, never more sequences than configured
    assert {len(r) for r in ranks} == {layout.micro_steps}
    assert {tuple(x.shape) for r in ranks for x, _ in r} == {(layout.micro_seqs, seq)}
    assert layout.micro_seqs <= window_seqs and layout.micro_steps * layout.micro_seqs * world == one.batch_seqs
    if windows % world == 0:  # whole micro-batches: grad_accum_steps / world_size of them
        assert (layout.micro_steps, layout.micro_seqs) == (windows // world, window_seqs)
    elif world % windows == 0:  # each micro-batch split over world / windows ranks
        assert (layout.micro_steps, layout.micro_seqs) == (1, window_seqs * windows // world)

    def rows(batches):
        return sorted(zip(*(torch.cat([t for t, _ in batches]).tolist(), torch.cat([t for _, t in batches]).tolist())))

    # the same (input, target) sequences as one process: the batch does not depend on the world size
    assert sorted(r for rank in ranks for r in rows(rank)) == rows(reference)
    assert layout.step_tokens == one.step_tokens


def test_a_batch_the_ranks_cannot_share_fails_with_the_numbers_and_the_fix():
    with pytest.raises(OptionError) as info:
        batch_layout(524_288, 8, 1024, 3)  # the baseline on 3 processes
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        "batch_tokens=524288 is 512 sequences of seq_len=1024 per step, which 3 processes cannot share equally "
        "(170.67 each): run a process count that divides 512 (e.g. --nproc_per_node=2 or 4), or --set "
        "batch_tokens=516096 or 540672 (a multiple of 24576 splits into whole sequences for 3 processes and for "
        "grad_accum_steps=8)"
    )
    for suggested in (516_096, 540_672):
        batch_layout(suggested, 8, 1024, 3)  # the fix works
    with pytest.raises(OptionError, match=r"divides 16 \(e.g. --nproc_per_node=16\), or --set batch_tokens=8192 "):
        batch_layout(4096, 1, 256, 32)  # more processes than sequences
    with pytest.raises(OptionError, match="whole seq_len=256 sequences; use a multiple of 512"):
        batch_layout(4096 + 256, 2, 256, 1)


# ---------------------------------------------------------------- QAT
def _random_weights(model: GPT, seed: int = 0) -> GPT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


def test_fake_quantize_is_quantize_rtn_and_the_gradient_passes_straight_through():
    spec = parse_qat_clip("sdclip:mlp=3,attn=4")
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fake_quantize(w, 4, spec, "mlp"), quantize_rtn(w, 4, spec, role="mlp").dequantize(),
                               rtol=0, atol=0)
    torch.manual_seed(0)
    model = _random_weights(GPT(GPTConfig(**MICRO_MODEL)))
    reference = _random_weights(GPT(GPTConfig(**MICRO_MODEL)))
    with torch.no_grad():  # the reference holds the fake-quantized weights themselves
        for name, p in reference.named_parameters():
            if ".mlp." in name:
                p.copy_(fake_quantize(p, 4, spec, "mlp"))
    attach_qat(model, {"mlp": 4}, spec)
    set_qat(model, True)
    x = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    model(x, x).backward()
    reference(x, x).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)  # STE: d/dw at q(w), passed to w unchanged


def test_qat_options_are_checked():
    assert parse_qat("mlp=int4, attn=int6") == {"mlp": 4, "attn": 6} and parse_qat("") == {}
    for bad in ("mlp=fp16", "control=int4", "mlp", "mlp=int4,mlp=int5"):
        with pytest.raises(OptionError):
            parse_qat(bad)
    with pytest.raises(OptionError, match="QAT supports"):
        parse_qat_clip("size:3")
    with pytest.raises(OptionError, match="no linear layer"):  # the tied embedding is no CastedLinear
        attach_qat(GPT(GPTConfig(**MICRO_MODEL)), {"embed": 8}, parse_clip("amax"))
    assert parse_clip(quantize_default_clip())  # the CLI's QAT default is quantize's own default


def _qat_compiled_check(backend: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, seq_len=16)
    spec = parse_qat_clip("sdclip:2.5")
    model = _random_weights(GPT(config))
    attach_qat(model, {"mlp": 3, "attn": 4}, spec)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))

    def quantized_reference() -> GPT:  # a plain model holding quantize's RTN weights
        ref = GPT(config)
        sd = {n: (fake_quantize(t, 3 if ".mlp." in n else 4, spec, "mlp" if ".mlp." in n else "attn")
                  if ".mlp." in n or ".attn.c_" in n or "attn.proj" in n else t) for n, t in model.state_dict().items()}
        ref.load_state_dict(sd)
        return ref

    with torch.no_grad():
        off = [compiled(x, x) for _ in range(2)]  # the second call settles the RoPE-table guard
        frames = counter.frame_count
        set_qat(model, True)
        on = compiled(x, x)
        torch.testing.assert_close(on, model(x, x), rtol=1e-6, atol=0)  # = the eager fake-quantized forward
        torch.testing.assert_close(on, quantized_reference()(x, x), rtol=1e-5, atol=0)
        for p in model.parameters():  # an "optimizer step", then the per-step refresh
            p.mul_(1.1)
        refresh_qat(model)
        stepped = compiled(x, x)
        torch.testing.assert_close(stepped, quantized_reference()(x, x), rtol=1e-5, atol=0)
        set_qat(model, False)
        off_again = compiled(x, x)
    assert counter.frame_count == frames  # the switch is data: no recompilation, nothing constant-folded
    assert abs(float(on) - float(off[1])) > 1e-3 and abs(float(stepped) - float(on)) > 1e-3
    torch.testing.assert_close(off_again, model(x, x), rtol=1e-6, atol=0)


def test_qat_switch_survives_torch_compile():
    _qat_compiled_check("aot_eager")  # dynamo + AOTAutograd: where a Python flag would be baked in


@pytest.mark.slow
def test_qat_switch_survives_torch_compile_inductor():
    _qat_compiled_check("inductor")  # the default backend (C++ codegen on CPU: ~40 s here)


def test_cli_typed_flags_and_qat_clip_default(data_dir, tmp_path):
    args = ["--data", str(data_dir), "-o", str(tmp_path / "f.pt"), "--steps", "2", "--json", "--qat", "mlp=int4",
            "--qat-start", "0.5", "--ema", "0.9", "--max-wallclock", "1000", "--set", "val_every=0"]
    for k, v in {**MICRO_MODEL, "batch_tokens": 128, "amp": "fp32"}.items():
        args += ["--set", f"{k}={v}"]
    res = CliRunner().invoke(train_command, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["train"]["qat_clip"] == quantize_default_clip()  # QAT trains on quantize's grid by default
    assert (out["train"]["ema_decay"], out["train"]["max_wallclock_seconds"]) == (0.9, 1000.0)
    assert [e["qat"] for e in out["log"]] == [False, True]
    assert load_checkpoint(tmp_path / "f.pt").extra["train_config"]["qat"] == "mlp=int4"
