"""One optimizer step's global batch: which tokens it holds, and how the ranks share it.

A configuration states the global batch, `batch_tokens` per optimizer step, and the number of micro-batches it
is written for, `grad_accum_steps` (the baseline: 524,288 tokens as 8 micro-batches of 64 sequences). The global
batch is then `grad_accum_steps` consecutive windows of the token stream, each of batch_tokens/grad_accum_steps
+ 1 tokens (the extra token is the last target): a fixed list of sequences, whatever the number of processes.
These are the windows the baseline's DistributedTokenLoader reads on any world size that divides its 8.

The processes share that list equally (so batch_tokens / world_size must be a whole number of sequences) and
go through it in rounds: in micro-step k, rank r takes the sequences [(k * world + r) * m, (k * world + r + 1) * m)
with m = `micro_seqs`. The world size decides only the micro-batching, never the batch:
* world_size divides grad_accum_steps: every rank runs grad_accum_steps / world_size whole micro-batches, rank
  r the windows r, r + world, ... (the baseline's grad_accum_steps = 8 // world_size, window for window);
* world_size a multiple of grad_accum_steps (the tiny preset has one micro-batch): every micro-batch is split,
  each rank runs one equal share of one;
* otherwise each rank runs its share in the fewest equal micro-batches that are no larger than the
  configuration's own.

Every rank's loss is the mean over its micro-batch, scaled by 1/micro_steps, and DDP averages the gradients
over the ranks: every micro-batch has the same size, so the loss and the gradient are the mean over the same
global batch for every world size. What the world size changes is only how the float sums are grouped:
inside a micro-batch (a split one sums over fewer tokens per rank) and across them (accumulation on a rank,
then DDP's all-reduce). Where neither changes, as for 1 process against 2 with grad_accum_steps=2 (the same two
micro-batches, added once either way), the run is bit-identical; otherwise it agrees to the rounding of those
sums (tests/test_train_ddp.py: the tiny preset's micro-batch split over 2 processes, losses ~1e-7 apart).
"""
from __future__ import annotations

import glob
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from golfquant.data import check_tokens_fit, read_shard
from golfquant.errors import DataError, OptionError


@dataclass(frozen=True)
class BatchLayout:
    """The global batch of one step and this world size's micro-batching (`batch_layout` builds it)."""

    seq_len: int
    windows: int  # windows of the token stream per step (grad_accum_steps)
    window_seqs: int  # sequences per window: the configuration's micro-batch
    world_size: int
    micro_steps: int  # micro-batches each rank runs per step
    micro_seqs: int  # sequences in each of them

    @property
    def batch_seqs(self) -> int:
        return self.windows * self.window_seqs

    @property
    def batch_tokens(self) -> int:
        return self.batch_seqs * self.seq_len

    @property
    def micro_tokens(self) -> int:
        return self.micro_seqs * self.seq_len

    @property
    def step_tokens(self) -> int:
        """How far the token stream advances per step (each window carries one extra target token)."""
        return self.windows * (self.window_seqs * self.seq_len + 1)

    def rank_rows(self, rank: int) -> list[slice]:
        """The rows of the step's sequence list that rank `rank` runs, one slice per micro-step, in order."""
        m, w = self.micro_seqs, self.world_size
        return [slice((k * w + rank) * m, (k * w + rank + 1) * m) for k in range(self.micro_steps)]

    def describe(self) -> str:
        return (f"{self.micro_steps} x {self.micro_seqs} sequences per process per step "
                f"({self.batch_tokens:,} tokens over {self.world_size} process(es))")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def batch_layout(batch_tokens: int, grad_accum_steps: int, seq_len: int, world_size: int) -> BatchLayout:
    """The micro-batching of a global batch on `world_size` processes; OptionError (one line, with the fix)
    unless the micro-batches and every rank's share are whole sequences."""
    window_tokens, rest = divmod(batch_tokens, grad_accum_steps)
    if rest or window_tokens % seq_len:
        raise OptionError(
            f"batch_tokens={batch_tokens} must split into grad_accum_steps={grad_accum_steps} micro-batches of "
            f"whole seq_len={seq_len} sequences; use a multiple of {grad_accum_steps * seq_len} "
            f"(--set batch_tokens=...) or another grad_accum_steps"
        )
    seqs = batch_tokens // seq_len
    if seqs % world_size:
        raise OptionError(_unshareable(batch_tokens, grad_accum_steps, seq_len, world_size))
    per_rank, window_seqs = seqs // world_size, window_tokens // seq_len
    # the fewest equal micro-batches of at most the configured size (grad_accum_steps / world when that divides)
    micro_steps = next(a for a in _divisors(per_rank) if a * window_seqs >= per_rank)
    return BatchLayout(seq_len, grad_accum_steps, window_seqs, world_size, micro_steps, per_rank // micro_steps)


def _unshareable(batch_tokens: int, grad_accum_steps: int, seq_len: int, world_size: int) -> str:
    seqs = batch_tokens // seq_len
    below = max(d for d in _divisors(seqs) if d < world_size)
    above = [d for d in _divisors(seqs) if d > world_size]
    counts = f"{below} or {above[0]}" if above else f"{below}"
    unit = math.lcm(world_size, grad_accum_steps) * seq_len
    sizes = [b for b in (batch_tokens // unit * unit, (batch_tokens // unit + 1) * unit) if b > 0]
    return (
        f"batch_tokens={batch_tokens} is {seqs} sequences of seq_len={seq_len} per step, which {world_size} "
        f"processes cannot share equally ({seqs / world_size:.2f} each): run a process count that divides {seqs} "
        f"(e.g. --nproc_per_node={counts}), or --set batch_tokens={' or '.join(map(str, sizes))} (a multiple of "
        f"{unit} splits into whole sequences for {world_size} processes and for grad_accum_steps={grad_accum_steps})"
    )


class TokenStream:
    """Reads the train shards in name order, one at a time, wrapping around forever (deterministic).

    Shards stay uint16 in memory; only the spans taken are widened to int64.
    """

    def __init__(self, pattern: str, vocab_size: int):
        self.files = sorted(glob.glob(str(pattern)))
        if not self.files:
            raise DataError(f"no train shard matches {pattern!r}; check --data or build one with "
                            "`golfquant data build`")
        self.vocab_size = vocab_size
        self.file_idx = -1
        self.tokens = np.empty(0, dtype=np.uint16)
        self.pos = 0

    def _open(self, idx: int) -> None:
        self.file_idx = idx % len(self.files)
        self.tokens = read_shard(self.files[self.file_idx])
        self.pos = 0

    def take(self, n: int) -> Tensor:
        chunks, remaining = [], n
        while remaining > 0:
            if self.pos >= self.tokens.size:
                self._open(self.file_idx + 1)
                continue
            k = min(remaining, self.tokens.size - self.pos)
            chunk = torch.from_numpy(self.tokens[self.pos : self.pos + k].astype(np.int64))
            check_tokens_fit(chunk, self.vocab_size, source=f"train shard {self.files[self.file_idx]}")
            chunks.append(chunk)
            self.pos += k
            remaining -= k
        return torch.cat(chunks)

    def step(self, layout: BatchLayout, rank: int = 0) -> list[tuple[Tensor, Tensor]]:
        """This rank's micro-batches of the next step: (inputs, targets), each [micro_seqs, seq_len].

        Every rank reads the whole step (`layout.step_tokens`) and keeps its rows, so all ranks' streams stay
        at the same position, the one a single process reaches.
        """
        span = layout.window_seqs * layout.seq_len + 1
        windows = self.take(layout.windows * span).view(layout.windows, span)
        x = windows[:, :-1].reshape(-1, layout.seq_len)
        y = windows[:, 1:].reshape(-1, layout.seq_len)
        return [(x[rows], y[rows]) for rows in layout.rank_rows(rank)]

    def state(self) -> dict:
        return {"file": self.file_idx, "pos": self.pos, "files": len(self.files)}

    def restore(self, state: dict) -> None:
        if state["file"] >= 0:
            self._open(state["file"])
            self.pos = min(state["pos"], self.tokens.size)
