"""Shared fixtures of the hardening tests: a tiny random GPT checkpoint, token shards, the CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from golfquant.checkpoint import save_checkpoint
from golfquant.data import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, default_tokenizer_path, write_shard
from golfquant.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = default_tokenizer_path()
# vocab 1024 = the bundled tokenizer's; tok_emb (131,072 elements) is the only matrix above the 65,536-element
# passthrough limit, so pass --float-max-numel 0 to quantize every matrix.
TINY = dict(vocab_size=1024, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2, mlp_mult=2, seq_len=64)


def tiny_state_dict(seed: int = 0, **overrides) -> tuple[dict[str, torch.Tensor], dict]:
    """A GPT(TINY) state_dict with random weights of trained scale (matrices ~N(0, 1/sqrt(fan_in)))."""
    config = GPTConfig(**(TINY | overrides))
    torch.manual_seed(seed)
    model = GPT(config)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in model.state_dict().items():
        if t.dim() == 2:
            t = torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5
        sd[name] = t.detach().clone()
    return sd, config.to_dict()


def tiny_checkpoint(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    sd, config = tiny_state_dict(seed, **overrides)
    save_checkpoint(path, sd, config)
    return Path(path)


def val_shard(path: str | os.PathLike, n_tokens: int = 300, vocab: int = 1024, seed: int = 0) -> Path:
    """A valid shard of random ids in [4, vocab) with a BOS (1) every 50 tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab, n_tokens)
    tokens[::50] = 1
    write_shard(path, tokens)
    return Path(path)


def raw_shard(path: str | os.PathLike, tokens, magic: int = SHARD_MAGIC, count: int | None = None) -> Path:
    """A shard written byte by byte, so its header may lie (bad magic, wrong count)."""
    arr = np.asarray(tokens, dtype="<u2")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (magic, SHARD_VERSION, arr.size if count is None else count)
    Path(path).write_bytes(header.tobytes() + arr.tobytes())
    return Path(path)


def start_python(*argv, threads: int = 1) -> subprocess.Popen:
    """`python ARGV...` in the background, from the repository, with GOLFQUANT_THREADS=threads."""
    env = os.environ | {"GOLFQUANT_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def start_cli(*args, threads: int = 1) -> subprocess.Popen:
    """The real entry point (`python -m golfquant_cli.main`), as a user would start it, in the background."""
    return start_python("-m", "golfquant_cli.main", *args, threads=threads)


def run_cli(*args, threads: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = start_cli(*args, threads=threads)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def leftovers(folder: Path, keep: set[str] = frozenset()) -> list[str]:
    """Files in `folder` other than `keep` (temp files of an interrupted atomic write start with '.')."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)
