"""The challenge baseline's training recipe, on one process or under torchrun (DDP).

Muon for the 2-D block matrices, Adam for the embedding (and untied head) and for the control tensors, linear
LR warmdown at the end (by step, or by wallclock when a cap is set, as the baseline does), val_bpb every
`val_every` steps and at the end, then an atomic checkpoint in the baseline's state_dict layout, written by
rank 0.

Distributed as the baseline is, on any world size that splits the global batch into whole sequences: the
global batch (batch_tokens as grad_accum_steps micro-batches) is the same on every world size and the ranks
share it equally, running whole micro-batches or equal shares of one (batches.py); gradients are averaged by
DistributedDataParallel (synchronised on the last micro-batch only); Muon orthogonalizes a 1/world_size share of
the matrices per rank (muon.py).
Every decision that depends on the clock (stop at the cap, warmdown, QAT switch) is taken from the slowest
rank's clock, all-reduced, so all ranks agree.

Options beyond the baseline: EMA of the weights (the checkpoint holds the EMA), torch.compile, QAT (qat.py),
and resumable checkpoints (optimizer states, step, data position and clock in `extra["resume"]`). They all act
inside the one step loop, on its state, which is why they are not separate modules.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from golfquant import distributed
from golfquant.checkpoint import load_checkpoint, save_checkpoint
from golfquant.data import build_byte_luts, check_tokenizer_fits, check_tokens_fit, load_tokens
from golfquant.errors import CheckpointError, DataError, OptionError
from golfquant.evaluate import EvalResult, eval_val_bpb
from golfquant.model import GPT, CastedLinear, GPTConfig
from golfquant.plan import is_control_tensor
from golfquant.train.batches import TokenStream, batch_layout
from golfquant.train.muon import Muon, muon_momentum
from golfquant.train.qat import attach_qat, detach_qat, parse_qat, parse_qat_clip, refresh_qat, set_qat

SAVE_DTYPES = ("baseline", "bfloat16", "float32")
# The buffers (RoPE tables, QAT switches) are equal on all ranks by construction: skip DDP's per-forward
# broadcast, as the baseline does. torch 2.13 renamed the flag; older builds (on the GPU node) know only the old.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})
AMP_MODES = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    steps: int = 20000  # length of the schedule (warmdown, QAT start)
    batch_tokens: int = 524_288  # tokens per optimizer step over all ranks and micro-batches
    grad_accum_steps: int = 1  # micro-batches the global batch is written as, over all ranks (the baseline: 8):
    # each rank runs grad_accum_steps / world_size of them, or an equal share of one (batches.py)
    matrix_lr: float = 0.04
    tied_embed_lr: float = 0.05
    embed_lr: float = 0.6  # untied embeddings only
    head_lr: float = 0.008  # untied lm_head only
    scalar_lr: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    warmdown_steps: int = 1200  # LR decays linearly to 0 over the last warmdown_steps steps
    grad_clip_norm: float = 0.0  # 0 = off
    max_wallclock_seconds: float = 0.0  # 0 = off; else stop before the step that would pass it (not deterministic;
    # a resumed run counts the training time before the checkpoint)
    stop_step: int = 0  # 0 = steps; else end this run after that step (schedule unchanged), to --resume later
    val_every: int = 1000  # 0 = only at the end
    val_max_tokens: int = 0  # 0 = the whole validation split; else a prefix (for quick periodic checks)
    ema_decay: float = 0.0  # 0 = off; else the checkpoint holds an EMA of the weights with this decay per step
    compile: bool = False  # torch.compile the training forward pass
    qat: str = ""  # e.g. "mlp=int4,attn=int6": fake-quantize those roles' weights late in training
    qat_start: float = 0.85  # fraction of training (by step, or by wallclock when capped) where QAT switches on
    qat_clip: str = "amax"  # clip spec of the QAT quantizer; use the one you will quantize with
    resumable: bool = True  # store optimizer states, data position and step in the checkpoint for --resume
    seed: int = 1337
    amp: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with native bf16 matmul; else fp32
    device: str = "auto"  # auto: cuda (this rank's GPU) if available, else cpu
    save_dtype: str = "baseline"  # baseline: tok_emb bf16, rest fp32; bfloat16: all matrices bf16; float32

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "batch_tokens", "grad_accum_steps", "muon_backend_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmdown_steps", "val_every", "val_max_tokens", "muon_momentum_warmup_steps", "stop_step",
                     "max_wallclock_seconds"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay={self.ema_decay} must be in [0, 1) (0 = off; 0.997 is typical)")
        if not 0.0 <= self.qat_start <= 1.0:
            problems.append(f"qat_start={self.qat_start} must be a fraction of training in [0, 1]")
        if self.amp not in AMP_MODES:
            problems.append(f"amp={self.amp!r} must be one of {AMP_MODES}")
        if self.save_dtype not in SAVE_DTYPES:
            problems.append(f"save_dtype={self.save_dtype!r} must be one of {SAVE_DTYPES}")
        if problems:
            raise OptionError("invalid train config: " + "; ".join(problems))
        parse_qat(self.qat)
        parse_qat_clip(self.qat_clip)


@dataclass
class TrainProgress:
    """What the progress callback receives after every step (val_* set only on steps that evaluated)."""

    step: int
    steps: int
    train_loss: float
    tokens_per_s: float
    lr_scale: float
    train_seconds: float
    qat: bool = False
    val_loss: float | None = None
    val_bpb: float | None = None


@dataclass
class TrainResult:
    val_loss: float
    val_bpb: float
    steps: int
    train_tokens: int
    train_seconds: float
    tokens_per_s: float
    final_train_loss: float
    params: int
    out_path: str
    world_size: int = 1
    stopped_by_wallclock: bool = False


def lr_scale(step: int, train_seconds: float, cfg: TrainConfig) -> float:
    """LR multiplier: 1, then linear decay to 0 over the last warmdown_steps steps.

    With a wallclock cap the warmdown starts when the remaining time equals warmdown_steps times the mean
    step time so far (the baseline's rule), since the number of steps is then unknown.
    """
    if cfg.warmdown_steps <= 0:
        return 1.0
    if cfg.max_wallclock_seconds <= 0:
        left = cfg.steps - step
        return min(max(left / cfg.warmdown_steps, 0.0), 1.0)
    warmdown_s = cfg.warmdown_steps * train_seconds / max(step, 1)
    remaining_s = max(cfg.max_wallclock_seconds - train_seconds, 0.0)
    return remaining_s / max(warmdown_s, 1e-9) if remaining_s <= warmdown_s else 1.0


def training_fraction(step: int, train_seconds: float, cfg: TrainConfig) -> float:
    """How far training is: by step, or by the wallclock cap when that comes first."""
    frac = step / cfg.steps
    if cfg.max_wallclock_seconds > 0:
        frac = max(frac, train_seconds / cfg.max_wallclock_seconds)
    return frac


def next_step_exceeds_cap(step: int, train_seconds: float, cfg: TrainConfig) -> bool:
    """True when one more step of the mean duration so far would pass the wallclock cap (never before step 1)."""
    if cfg.max_wallclock_seconds <= 0 or step == 0:
        return False
    return train_seconds + train_seconds / step > cfg.max_wallclock_seconds


def build_optimizers(model: GPT, cfg: TrainConfig,
                     env: distributed.DistEnv = distributed.DistEnv()) -> tuple[list[torch.optim.Optimizer], Muon]:
    """Muon for the blocks' 2-D matrices; Adam for tok_emb (and lm_head) and for control/low-dim tensors."""
    matrices, scalars = [], []
    for name, p in model.blocks.named_parameters():
        (scalars if p.ndim < 2 or is_control_tensor(name) else matrices).append(p)
    scalars.append(model.skip_weights)
    embed_lr = cfg.tied_embed_lr if model.config.tie_embeddings else cfg.embed_lr
    adam = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    muon = Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps, env=env)
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.Adam([{"params": [model.tok_emb.weight], "lr": embed_lr}], **adam),
        muon,
        torch.optim.Adam([{"params": scalars, "lr": cfg.scalar_lr}], **adam),
    ]
    if model.lm_head is not None:
        optimizers.append(torch.optim.Adam([{"params": [model.lm_head.weight], "lr": cfg.head_lr}], **adam))
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers, muon


def export_state_dict(model: GPT, save_dtype: str) -> dict[str, Tensor]:
    """The model's state_dict on CPU with the dtype `save_dtype` picks per tensor.

    "baseline" reproduces the challenge's final_model.pt: its model is `.bfloat16()`'d, then CastedLinear
    weights and low-dim/control tensors go back to fp32, which leaves tok_emb bf16. "bfloat16" stores every
    non-control matrix in bf16 (half the size); control tensors stay fp32 in every mode.
    """
    casted = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, CastedLinear)}
    out = {}
    for name, t in model.state_dict().items():
        matrix = t.ndim >= 2 and not is_control_tensor(name)
        if save_dtype == "bfloat16" and matrix or save_dtype == "baseline" and matrix and name not in casted:
            dtype = torch.bfloat16
        else:
            dtype = torch.float32
        out[name] = t.detach().to("cpu", dtype).contiguous()
    return out


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        # Under torchrun, init_from_env made this rank's GPU (LOCAL_RANK) the current one.
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise OptionError(f"device={cfg.device!r} is not a torch device (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device={cfg.device!r} but CUDA is not available; use device=cpu")
    return device


def _use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.amp != "auto":
        return cfg.amp == "bf16"
    if device.type == "cuda":
        return True
    # CPU autocast is ~2x faster with native bf16 matmul (AVX512-BF16/AMX) and much slower without it.
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _load_val(val_pattern: str, model_config: GPTConfig) -> Tensor:
    """The validation tokens, checked before training so that a bad split fails now, not at the end."""
    tokens = load_tokens(val_pattern)
    check_tokens_fit(tokens, model_config.vocab_size)
    if tokens.numel() < model_config.seq_len + 1:
        raise DataError(
            f"validation split {val_pattern!r} has {tokens.numel()} tokens, fewer than seq_len+1="
            f"{model_config.seq_len + 1}; use a shorter seq_len or more validation data"
        )
    return tokens


@dataclass
class _Clock:
    """Run counters that a resumed run continues."""

    step: int = 0
    train_seconds: float = 0.0
    tokens: int = 0
    qat_on: bool = False


def _cpu_tree(obj):
    """Tensors of a nested optimizer state moved to CPU (checkpoints never hold device tensors)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_tree(v) for v in obj)
    return obj


def _resume_state(live: dict[str, Tensor], saved: dict[str, Tensor], optimizers, ema: dict[str, Tensor] | None,
                  stream: TokenStream, clock: _Clock, cfg: TrainConfig) -> dict:
    """What --resume needs beyond the saved state_dict (plain containers, tensors and numbers only).

    `params` holds the live fp32 weights only where the saved copy differs from them (bf16 rounding, EMA).
    The clock is stored only under a wallclock cap (nothing else reads it), so uncapped runs stay byte-exact.
    """
    params = {n: t for n, t in live.items() if ema is not None or saved[n].dtype != t.dtype}
    return {
        "step": clock.step, "tokens": clock.tokens, "qat_on": clock.qat_on,
        "train_seconds": clock.train_seconds if cfg.max_wallclock_seconds > 0 else 0.0,
        "data": stream.state(), "params": params,
        "optimizers": [_cpu_tree(opt.state_dict()) for opt in optimizers],
        "ema": None if ema is None else {n: t.cpu() for n, t in ema.items()},
    }


_RESUME_KEYS = {"step", "tokens", "qat_on", "train_seconds", "data", "params", "optimizers", "ema"}


def _read_resume(path: str | Path, model_config: GPTConfig, stop_step: int) -> tuple[dict[str, Tensor], dict]:
    ckpt = load_checkpoint(path)
    state = ckpt.extra.get("resume")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds no resume state (not written by `golfquant train`, or with "
                              "resumable=false); start a new run instead")
    missing = sorted(_RESUME_KEYS - set(state))
    if missing:
        raise CheckpointError(f"{path}: resume state lacks {', '.join(missing)} (damaged, or from another "
                              "golfquant version); start a new run instead")
    if ckpt.config != model_config.to_dict():
        diff = sorted(k for k in model_config.to_dict() if (ckpt.config or {}).get(k) != getattr(model_config, k))
        raise CheckpointError(f"{path}: was trained with another model config (differs in {', '.join(diff)}); "
                              "resume with the same --preset and model --set values")
    if state["step"] >= stop_step:
        raise OptionError(f"{path} is already at step {state['step']}, not before the stop at step {stop_step}; "
                          "raise --steps (or stop_step) to train further")
    return ckpt.state_dict, state


def _restore(state: dict, saved: dict[str, Tensor], model: GPT, optimizers, ema: dict[str, Tensor] | None,
             stream: TokenStream, path) -> _Clock:
    model.load_state_dict({**saved, **state["params"]}, strict=True)
    if len(state["optimizers"]) != len(optimizers):
        raise CheckpointError(f"{path}: holds {len(state['optimizers'])} optimizer states, this run has "
                              f"{len(optimizers)} (tie_embeddings changed?)")
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        base_lrs = [g["base_lr"] for g in opt.param_groups]  # this run's learning rates, not the saved ones
        opt.load_state_dict(opt_state)
        for group, base_lr in zip(opt.param_groups, base_lrs):
            group["base_lr"] = base_lr
    if (ema is None) != (state["ema"] is None):
        raise CheckpointError(f"{path}: EMA was {'off' if state['ema'] is None else 'on'} in that run; "
                              "resume with the same --ema")
    if ema is not None:
        for name, t in ema.items():
            t.copy_(state["ema"][name])
    stream.restore(state["data"])
    return _Clock(state["step"], float(state["train_seconds"]), state["tokens"], bool(state["qat_on"]))


def _compile_warmup(ddp_model, micro_seqs: int, seq_len: int, device: torch.device, bf16: bool) -> None:
    """Compile outside the timed steps (the baseline's warmup): two forward/backward passes, gradients dropped.

    Two, because the first call fills the RoPE table, which the second call's guards see as a new state.
    """
    x = torch.zeros(micro_seqs, seq_len, dtype=torch.int64, device=device)
    for _ in range(2):
        with _autocast(device, bf16):
            ddp_model(x, x).backward()
    for p in ddp_model.parameters():
        p.grad = None


def train(
    model_config: GPTConfig,
    train_config: TrainConfig,
    train_pattern: str,
    val_pattern: str,
    tokenizer_path: str | Path,
    out_path: str | Path,
    progress: Callable[[TrainProgress], None] | None = None,
    resume: str | Path | None = None,
) -> TrainResult:
    """Train GPT(model_config) from the seed (or from `resume`), evaluate val_bpb, write a checkpoint.

    Runs on every rank of the current process group (distributed.init_from_env); `progress` is called on
    rank 0 only, and only rank 0 writes `out_path`. The final val_bpb is measured on the weights exactly as
    saved (after EMA and the `save_dtype` rounding, without QAT's fake quantization), so it is the checkpoint's
    score.
    """
    cfg, seq_len = train_config, model_config.seq_len
    env = distributed.current()
    # before any work: a global batch the ranks cannot share in whole sequences fails here, in one line
    layout = batch_layout(cfg.batch_tokens, cfg.grad_accum_steps, seq_len, env.world_size)
    accum = layout.micro_steps
    stop_step = min(cfg.stop_step or cfg.steps, cfg.steps)
    device = _device(cfg)
    bf16 = _use_bf16(cfg, device)
    luts = build_byte_luts(tokenizer_path, model_config.vocab_size)
    check_tokenizer_fits(luts, model_config.vocab_size)
    val_tokens = _load_val(val_pattern, model_config)
    stream = TokenStream(train_pattern, model_config.vocab_size)
    resumed = _read_resume(resume, model_config, stop_step) if resume is not None else None

    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device)
    if cfg.qat:
        attach_qat(model, parse_qat(cfg.qat), parse_qat_clip(cfg.qat_clip))
    optimizers, muon = build_optimizers(model, cfg, env)
    ema = ({n: p.detach().float().clone() for n, p in model.state_dict().items()} if cfg.ema_decay > 0 else None)
    clock = _Clock()
    if resumed is not None:
        clock = _restore(resumed[1], resumed[0], model, optimizers, ema, stream, resume)
    set_qat(model, clock.qat_on)
    params = dict(model.named_parameters())

    forward = torch.compile(model) if cfg.compile else model
    if env.enabled:
        forward = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None,
                                          **_NO_BUFFER_SYNC)
    if cfg.compile:
        _compile_warmup(forward, layout.micro_seqs, seq_len, device, bf16)

    def evaluate(max_tokens: int | None) -> EvalResult:
        return eval_val_bpb(model, val_tokens, luts, seq_len, device=device, max_tokens=max_tokens)

    loss_value, stopped_by_clock = math.nan, False
    model.train()
    while clock.step < stop_step:
        # The slowest rank's clock drives every time-based decision, so all ranks take the same ones.
        shared = distributed.all_reduce_(torch.tensor([clock.train_seconds], dtype=torch.float64, device=device), "max")
        clock.train_seconds = float(shared)
        if next_step_exceeds_cap(clock.step, clock.train_seconds, cfg):
            stopped_by_clock = True
            break
        if cfg.qat and not clock.qat_on and training_fraction(clock.step, clock.train_seconds, cfg) >= cfg.qat_start:
            clock.qat_on = True
            set_qat(model, True)
        t0 = time.perf_counter()
        scale = lr_scale(clock.step, clock.train_seconds, cfg)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for micro, (x, y) in enumerate(stream.step(layout, env.rank)):
            # DDP all-reduces the gradients on the last micro-batch only.
            sync = forward.no_sync() if env.enabled and micro < accum - 1 else contextlib.nullcontext()
            with sync:
                with _autocast(device, bf16):
                    loss = forward(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                (loss / accum).backward()
            loss_sum += loss.detach()
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(clock.step, cfg.muon_momentum_warmup_start, cfg.muon_momentum,
                                              cfg.muon_momentum_warmup_steps)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        if clock.qat_on:
            refresh_qat(model)
        if ema is not None:
            with torch.no_grad():
                for name, t in ema.items():
                    t.lerp_(params[name].detach(), 1.0 - cfg.ema_decay)
        # every micro-batch on every rank holds the same number of tokens: the mean of their means
        loss_value = float(distributed.all_reduce_(loss_sum)) / (accum * env.world_size)
        if not math.isfinite(loss_value):
            raise OptionError(f"training diverged at step {clock.step + 1} (loss {loss_value}); "
                              "lower the learning rates")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_seconds = time.perf_counter() - t0
        clock.train_seconds += step_seconds
        clock.tokens += cfg.batch_tokens
        clock.step += 1
        event = TrainProgress(clock.step, cfg.steps, loss_value, cfg.batch_tokens / step_seconds, scale,
                              clock.train_seconds, clock.qat_on)
        if cfg.val_every and clock.step % cfg.val_every == 0 and clock.step < stop_step:
            quick = evaluate(cfg.val_max_tokens or None)
            event.val_loss, event.val_bpb = quick.val_loss, quick.val_bpb
        if progress is not None and env.is_main:
            progress(event)

    live = {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()} if cfg.resumable else {}
    # The checkpoint holds plain weights: EMA'd if on, never fake-quantized.
    detach_qat(model)
    if ema is not None:
        model.load_state_dict(ema, strict=True)
    state_dict = export_state_dict(model, cfg.save_dtype)
    extra = {}
    if cfg.resumable:
        extra["resume"] = _resume_state(live, state_dict, optimizers, ema, stream, clock, cfg)
    model.load_state_dict(state_dict, strict=True)  # score the weights exactly as saved
    final = evaluate(None)
    result = TrainResult(
        val_loss=final.val_loss, val_bpb=final.val_bpb, steps=clock.step, train_tokens=clock.tokens,
        train_seconds=clock.train_seconds, tokens_per_s=clock.tokens / max(clock.train_seconds, 1e-9),
        final_train_loss=loss_value, params=sum(p.numel() for p in model.parameters()), out_path=str(out_path),
        world_size=env.world_size, stopped_by_wallclock=stopped_by_clock,
    )
    extra.update({
        "train_config": asdict(cfg), "amp": "bf16" if bf16 else "fp32", "world_size": env.world_size,
        "val_loss": result.val_loss, "val_bpb": result.val_bpb, "val_tokens": int(final.tokens),
        "steps": clock.step, "train_tokens": clock.tokens, "stopped_by_wallclock": stopped_by_clock,
    })  # no timings (unless capped, for resume): the same config and data give the same checkpoint bytes
    if env.is_main:
        save_checkpoint(out_path, state_dict, model_config.to_dict(), extra)
    distributed.barrier()  # every rank returns once the checkpoint exists
    return result

