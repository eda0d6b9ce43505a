"""The challenge's val_bpb (brief §1.4), non-overlapping or with the corrected sliding window (§1.5).

Both paths score the same targets: the stream is first cut to whole sequences, as the records'
`load_validation_tokens` does, so the sliding window differs only in the context each target gets.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from golfquant.calib import model_logits
from golfquant.data import ByteLUTs, check_tokens_fit, count_target_bytes
from golfquant.distributed import all_reduce_, current
from golfquant.errors import DataError, OptionError


@dataclass(frozen=True)
class EvalResult:
    val_loss: float  # nats per scored token
    val_bpb: float
    tokens: int  # scored target tokens
    bytes: int  # bytes those targets stand for


@dataclass(frozen=True)
class _Batch:
    x: torch.Tensor  # [B, T] inputs
    y: torch.Tensor  # [B, T] targets
    scored: torch.Tensor | None  # [B, T] bool, None = every position


def _contiguous_batches(tokens: torch.Tensor, seq_len: int, batch_seqs: int) -> Iterator[_Batch]:
    n_seq = (tokens.numel() - 1) // seq_len
    for first in range(0, n_seq, batch_seqs):
        last = min(first + batch_seqs, n_seq)
        chunk = tokens[first * seq_len:last * seq_len + 1]
        yield _Batch(chunk[:-1].view(-1, seq_len), chunk[1:].view(-1, seq_len), None)


def _window_starts(n_targets: int, seq_len: int, stride: int) -> list[int]:
    # Corrected rule: a window is kept only if it has targets left to score past seq_len - stride, so the
    # trailing partial windows never re-score tokens (the 2026-04-01 fix).
    return [ws for ws in range(0, n_targets, stride) if ws + seq_len - stride < n_targets]


def _sliding_batches(tokens: torch.Tensor, seq_len: int, stride: int, batch_seqs: int) -> Iterator[_Batch]:
    n_targets = tokens.numel() - 1
    starts = _window_starts(n_targets, seq_len, stride)
    pos = torch.arange(seq_len, device=tokens.device)
    for i in range(0, len(starts), batch_seqs):
        group = starts[i:i + batch_seqs]
        x = torch.zeros(len(group), seq_len, dtype=tokens.dtype, device=tokens.device)
        y = torch.zeros_like(x)
        lo, hi = [], []
        for row, ws in enumerate(group):
            wlen = min(seq_len, n_targets - ws)
            # Positions past wlen stay padding; the model is causal, so they do not affect scored ones.
            x[row, :wlen] = tokens[ws:ws + wlen]
            y[row, :wlen] = tokens[ws + 1:ws + wlen + 1]
            # A fixed offset (not wlen - stride) keeps a trailing partial window off targets already scored.
            lo.append(0 if ws == 0 else seq_len - stride)
            hi.append(wlen)
        lo_t = torch.tensor(lo, device=tokens.device)[:, None]
        hi_t = torch.tensor(hi, device=tokens.device)[:, None]
        yield _Batch(x, y, (pos >= lo_t) & (pos < hi_t))


def _num_batches(tokens: torch.Tensor, seq_len: int, stride: int | None, batch_seqs: int) -> int:
    n = (tokens.numel() - 1) // seq_len if stride is None else len(_window_starts(tokens.numel() - 1, seq_len, stride))
    return math.ceil(n / batch_seqs)


def eval_val_bpb(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    luts: ByteLUTs,
    seq_len: int,
    batch_seqs: int = 32,
    stride: int | None = None,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """val_loss and val_bpb of `model` (logits from `calib.model_logits`) on a 1-D token stream.

    Either way the targets are tokens 1..((N-1)//seq_len)*seq_len of the stream's first N tokens (all, or
    max_tokens + 1). stride=None: contiguous sequences. stride=s: windows every s tokens, the first scoring all
    positions, the others their last s. `progress(done, total)` is called after each batch. Under torchrun the
    batches are shared over the processes and the loss, token and byte sums all-reduced in fp64, as the records'
    evaluation does; every process returns the result.
    """
    if seq_len < 1 or batch_seqs < 1:
        raise OptionError(f"seq_len and batch_seqs must be positive, got {seq_len} and {batch_seqs}")
    if stride is not None and not 1 <= stride <= seq_len:
        raise OptionError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    if max_tokens is not None:
        tokens = tokens[:max_tokens + 1]
    if tokens.numel() < seq_len + 1:
        raise DataError(f"validation tokens ({tokens.numel()}) are fewer than one sequence of seq_len + 1 = "
                        f"{seq_len + 1}; use a smaller seq_len or more validation data")
    # Whole sequences only, as the records' load_validation_tokens: the sliding path scores no tail they drop.
    tokens = tokens[:(tokens.numel() - 1) // seq_len * seq_len + 1]
    check_tokens_fit(tokens, luts.base_bytes.numel())
    device = torch.device(device)
    tokens = tokens.to(device=device, dtype=torch.int64)
    luts = luts.to(device)
    batches = (_contiguous_batches(tokens, seq_len, batch_seqs) if stride is None
               else _sliding_batches(tokens, seq_len, stride, batch_seqs))
    total = _num_batches(tokens, seq_len, stride, batch_seqs)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, tokens, bytes
    env, checked = current(), False
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for done, batch in enumerate(batches, 1):
                if done % env.world_size != env.rank % env.world_size:
                    continue
                with autocast:
                    logits = model_logits(model, batch.x)
                if not checked:  # the logits' width is known only now
                    check_tokens_fit(tokens, logits.shape[-1])
                    checked = True
                nll = F.cross_entropy(logits.float().flatten(0, 1), batch.y.flatten(), reduction="none")
                nbytes = count_target_bytes(batch.x, batch.y, luts).flatten()
                if batch.scored is not None:
                    keep = batch.scored.flatten()
                    nll, nbytes = nll[keep], nbytes[keep]
                sums += torch.stack([nll.double().sum(), torch.tensor(nll.numel(), dtype=torch.float64, device=device),
                                     nbytes.double().sum()])
                if progress is not None:
                    progress(done, total)
    finally:
        model.train(was_training)
    loss_sum, token_count, byte_count = all_reduce_(sums).tolist()
    token_count, byte_count = int(token_count), int(byte_count)

    val_loss = loss_sum / token_count
    val_bpb = (val_loss / math.log(2)) * (token_count / byte_count)
    return EvalResult(val_loss=val_loss, val_bpb=val_bpb, tokens=token_count, bytes=byte_count)
