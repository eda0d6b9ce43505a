"""The checkpoints the benchmarks run on: the bundled 4x320, a 3x512 trained here on first use, and synthetic
state_dicts of any shape with trained-like statistics.

The 3x512 (GQA, 4 KV heads, MLP 2x, vocab 1024, seq 256) has every matrix above the challenge's 65,536-element
float convention, as in record models, so a gain there comes from where the bits go, not from quantizing float
tensors. It is the `tiny` preset's recipe at that shape (550 steps x 4096 tokens on the bundled shards, one
thread, ~10 minutes here); the file is cached in benchmarks/cache/ (not committed) and its sha256 goes into
each benchmark's JSON.
"""
from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "golfquant" / "assets" / "model.pt"
WIDE = ROOT / "benchmarks" / "cache" / "wide_3x512.pt"
WIDE_SETTINGS = ("num_layers=3", "model_dim=512", "num_kv_heads=4", "resumable=false")


def wide_checkpoint() -> Path:
    if not WIDE.exists():
        args = [sys.executable, "-m", "golfquant_cli.main", "train", "--preset", "tiny", "--threads", "1",
                "--log-every", "50", "-o", str(WIDE)]
        for setting in WIDE_SETTINGS:
            args += ["--set", setting]
        subprocess.run(args, cwd=ROOT, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    return WIDE


def checkpoints() -> dict[str, Path]:
    return {"bundled 4x320": BUNDLED, "trained 3x512": wide_checkpoint()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# The challenge's baseline (9x512, vocab 1024, MLP 2x: 17.06 M parameters) and the SP8192 records' shape
# (11x512, MLP 3x, vocab 8192: ~30 M).
BASELINE_SHAPE = dict(vocab_size=1024, num_layers=9, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=2,
                      seq_len=1024)
RECORD_SHAPE = dict(vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=3,
                    seq_len=2048)


def synthetic_state_dict(seed: int = 0, **shape) -> dict[str, torch.Tensor]:
    """A GPT state_dict (BASELINE_SHAPE unless overridden) with trained-like statistics in every matrix above
    65,536 elements: Student-t (nu = 4) entries times a log-normal spread per output row (sigma 0.3) and per input
    column (sigma 0.5), scaled to std 1/sqrt(fan_in); a tied embedding whose rarely seen rows (2/3 of them) are
    near-identical."""
    from golfquant.model import GPT, GPTConfig

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sd = {}
    for name, t in GPT(GPTConfig(**(BASELINE_SHAPE | shape))).state_dict().items():
        if t.dim() == 2 and t.numel() > 65536:
            rows, cols = t.shape
            w = rng.standard_t(4, (rows, cols)) * np.exp(rng.normal(0, 0.3, (rows, 1))) \
                * np.exp(rng.normal(0, 0.5, (1, cols)))
            if name == "tok_emb.weight":
                rare = rng.random(rows) < 2 / 3
                w[rare] = w[0] + 0.003 * w[rare]
            t = torch.from_numpy(w / w.std() / math.sqrt(cols)).float()
        sd[name] = t.detach().clone()
    return sd
