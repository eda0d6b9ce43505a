"""Trainer v0: the challenge baseline's recipe on one process (CPU or one GPU).

Muon for the 2-D block matrices, Adam for the embedding (and untied head) and for the control tensors, linear
LR warmdown at the end (by step, or by wallclock when a cap is set, as the baseline does), val_bpb every
`val_every` steps and at the end, then an atomic checkpoint in the baseline's state_dict layout.

Distributed training slots in at three marked points: the batch slice of each rank (`TokenStream.batch`),
the gradient all-reduce (DDP around the model), and Muon's update all-reduce (see muon.py).
"""
from __future__ import annotations

import contextlib
import glob
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from golfquant.checkpoint import save_checkpoint
from golfquant.data import build_byte_luts, check_tokenizer_fits, check_tokens_fit, load_tokens
from golfquant.errors import DataError, OptionError
from golfquant.evaluate import eval_val_bpb
from golfquant.model import GPT, CastedLinear, GPTConfig, is_control_tensor
from golfquant.train.muon import Muon, muon_momentum

SAVE_DTYPES = ("baseline", "bfloat16", "float32")
AMP_MODES = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    steps: int = 20000
    batch_tokens: int = 524_288  # tokens per optimizer step, summed over micro-batches
    grad_accum_steps: int = 1  # micro-batches per step (bounds activation memory)
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
    max_wallclock_seconds: float = 0.0  # 0 = off; else stop there, warmdown timed against it (not deterministic)
    val_every: int = 1000  # 0 = only at the end
    val_max_tokens: int = 0  # 0 = the whole validation split; else a prefix (for quick periodic checks)
    seed: int = 1337
    amp: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with native bf16 matmul; else fp32
    device: str = "auto"  # auto: cuda if available, else cpu
    save_dtype: str = "baseline"  # baseline: tok_emb bf16, rest fp32; bfloat16: all matrices bf16; float32

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "batch_tokens", "grad_accum_steps", "muon_backend_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmdown_steps", "val_every", "val_max_tokens", "muon_momentum_warmup_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if self.amp not in AMP_MODES:
            problems.append(f"amp={self.amp!r} must be one of {AMP_MODES}")
        if self.save_dtype not in SAVE_DTYPES:
            problems.append(f"save_dtype={self.save_dtype!r} must be one of {SAVE_DTYPES}")
        if problems:
            raise OptionError("invalid train config: " + "; ".join(problems))


@dataclass
class TrainProgress:
    """What the progress callback receives after every step (val_* set only on steps that evaluated)."""

    step: int
    steps: int
    train_loss: float
    tokens_per_s: float
    lr_scale: float
    train_seconds: float
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


class TokenStream:
    """Reads the train shards in name order, one at a time, wrapping around forever (deterministic)."""

    def __init__(self, pattern: str, vocab_size: int):
        self.files = sorted(glob.glob(str(pattern)))
        if not self.files:
            raise DataError(f"no train shard matches {pattern!r}; check --data or build one with `golfquant data build`")
        self.vocab_size = vocab_size
        self.file_idx = -1
        self.tokens = torch.empty(0, dtype=torch.int64)
        self.pos = 0

    def _next_file(self) -> None:
        self.file_idx = (self.file_idx + 1) % len(self.files)
        self.tokens = load_tokens(self.files[self.file_idx])
        check_tokens_fit(self.tokens, self.vocab_size, source=f"train shard {self.files[self.file_idx]}")
        self.pos = 0

    def take(self, n: int) -> Tensor:
        chunks, remaining = [], n
        while remaining > 0:
            if self.pos >= self.tokens.numel():
                self._next_file()
                continue
            k = min(remaining, self.tokens.numel() - self.pos)
            chunks.append(self.tokens[self.pos : self.pos + k])
            self.pos += k
            remaining -= k
        return torch.cat(chunks)

    def batch(self, tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets [tokens/seq_len, seq_len] from the next tokens+1 stream tokens.

        (DDP: take world_size * (tokens + 1) tokens and keep this rank's span.)
        """
        span = self.take(tokens + 1)
        return span[:-1].reshape(-1, seq_len), span[1:].reshape(-1, seq_len)


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


def build_optimizers(model: GPT, cfg: TrainConfig) -> tuple[list[torch.optim.Optimizer], Muon]:
    """Muon for the blocks' 2-D matrices; Adam for tok_emb (and lm_head) and for control/low-dim tensors."""
    matrices, scalars = [], []
    for name, p in model.blocks.named_parameters():
        (scalars if p.ndim < 2 or is_control_tensor(name) else matrices).append(p)
    scalars.append(model.skip_weights)
    embed_lr = cfg.tied_embed_lr if model.config.tie_embeddings else cfg.embed_lr
    adam = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    muon = Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps)
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
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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


def train(
    model_config: GPTConfig,
    train_config: TrainConfig,
    train_pattern: str,
    val_pattern: str,
    tokenizer_path: str | Path,
    out_path: str | Path,
    progress: Callable[[TrainProgress], None] | None = None,
) -> TrainResult:
    """Train GPT(model_config) from the seed, evaluate val_bpb, write a checkpoint to `out_path`.

    The final val_bpb is measured on the weights exactly as saved (after the `save_dtype` rounding), so it
    is the checkpoint's score.
    """
    cfg, seq_len = train_config, model_config.seq_len
    micro_tokens = cfg.batch_tokens // cfg.grad_accum_steps
    if cfg.batch_tokens % cfg.grad_accum_steps or micro_tokens % seq_len:
        raise OptionError(
            f"batch_tokens={cfg.batch_tokens} must split into grad_accum_steps={cfg.grad_accum_steps} micro-batches "
            f"of whole seq_len={seq_len} sequences"
        )
    device = _device(cfg)
    bf16 = _use_bf16(cfg, device)
    luts = build_byte_luts(tokenizer_path, model_config.vocab_size)
    check_tokenizer_fits(luts, model_config.vocab_size)
    val_tokens = _load_val(val_pattern, model_config)
    stream = TokenStream(train_pattern, model_config.vocab_size)

    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device)
    optimizers, muon = build_optimizers(model, cfg)

    def evaluate(max_tokens: int | None):
        return eval_val_bpb(model, val_tokens, luts, seq_len, max_tokens=max_tokens, device=device)

    train_seconds, tokens_done, step, loss_value = 0.0, 0, 0, math.nan
    model.train()
    while step < cfg.steps:
        if cfg.max_wallclock_seconds > 0 and train_seconds >= cfg.max_wallclock_seconds:
            break
        t0 = time.perf_counter()
        scale = lr_scale(step, train_seconds, cfg)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for _ in range(cfg.grad_accum_steps):
            x, y = stream.batch(micro_tokens, seq_len)
            with _autocast(device, bf16):
                loss = model(x.to(device), y.to(device))
            (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach()
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step, cfg.muon_momentum_warmup_start, cfg.muon_momentum,
                                              cfg.muon_momentum_warmup_steps)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        loss_value = float(loss_sum) / cfg.grad_accum_steps
        if not math.isfinite(loss_value):
            raise OptionError(f"training diverged at step {step + 1} (loss {loss_value}); lower the learning rates")
        step_seconds = time.perf_counter() - t0
        train_seconds += step_seconds
        tokens_done += cfg.batch_tokens
        step += 1
        event = TrainProgress(step, cfg.steps, loss_value, cfg.batch_tokens / step_seconds, scale, train_seconds)
        if cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
            quick = evaluate(cfg.val_max_tokens or None)
            event.val_loss, event.val_bpb = quick.val_loss, quick.val_bpb
        if progress is not None:
            progress(event)

    state_dict = export_state_dict(model, cfg.save_dtype)
    model.load_state_dict(state_dict, strict=True)  # score the weights exactly as saved
    final = evaluate(None)
    result = TrainResult(
        val_loss=final.val_loss, val_bpb=final.val_bpb, steps=step, train_tokens=tokens_done,
        train_seconds=train_seconds, tokens_per_s=tokens_done / max(train_seconds, 1e-9),
        final_train_loss=loss_value, params=sum(p.numel() for p in model.parameters()), out_path=str(out_path),
    )
    extra = {
        "train_config": asdict(cfg), "amp": "bf16" if bf16 else "fp32",
        "val_loss": result.val_loss, "val_bpb": result.val_bpb, "val_tokens": int(final.tokens),
        "steps": step, "train_tokens": tokens_done,
    }  # no timings: the same config and data give the same checkpoint bytes
    save_checkpoint(out_path, state_dict, model_config.to_dict(), extra)
    return result

