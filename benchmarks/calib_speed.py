"""Calibration speed: KV-cache generation vs full-prefix recomputation, and Hessian capture time and precision.

Every number is measured in this run; nothing is extrapolated. For each model (the bundled
golfquant/assets/model.pt when present, and a randomly initialized baseline-size GPT, 9 x 512, vocab 1024):
* cache vs full prefix: both paths generate the SAME seqs x seq_len tokens (same seed); tokens/s and their ratio,
  and whether the two paths produced identical tokens;
* cache-only generation at the model's own sequence length (--long-seqs sequences);
* Hessian capture of those long sequences: seconds and tokens/s (fp32 per batch, fp64 across batches).

    .venv/bin/python benchmarks/calib_speed.py             # CPU defaults: 8 x 256 comparison, 8 x 1024 long
    .venv/bin/python benchmarks/calib_speed.py --seqs 64 --seq-len 1024 --long-seqs 64 --bf16   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from golfquant.atomic import atomic_write_text  # noqa: E402
from golfquant.calib import CalibConfig, capture_hessians, generate_tokens  # noqa: E402
from golfquant.factory import build_model  # noqa: E402
from golfquant.model import GPT, GPTConfig  # noqa: E402

BUNDLED = ROOT / "golfquant" / "assets" / "model.pt"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(name: str, model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    model = model.to(device).eval()
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    cfg = CalibConfig(seqs=args.seqs, seq_len=args.seq_len, batch=args.batch, seed=args.seed)
    with amp:
        generate_tokens(model, CalibConfig(seqs=1, seq_len=4, batch=1))  # warm-up (kernels, caches)
        sync(device)
        cached, t_cache = timed(lambda: generate_tokens(model, cfg, use_cache=True))
        sync(device)
        full, t_full = timed(lambda: generate_tokens(model, cfg, use_cache=False))
        sync(device)
        long_cfg = CalibConfig(seqs=args.long_seqs, batch=args.batch, seed=args.seed)
        long_tokens, t_long = timed(lambda: generate_tokens(model, long_cfg, use_cache=True))
        sync(device)
    n_cmp = cached.numel()
    h32, t_h32 = timed(lambda: capture_hessians(model, long_tokens, batch=args.batch))
    sync(device)
    distinct = {id(h): k for k, h in h32.items()}.values()
    row = {
        "model": name,
        "compare": {"seqs": cfg.seqs, "seq_len": cached.shape[1], "batch": cfg.batch,
                    "cache_s": round(t_cache, 3), "full_prefix_s": round(t_full, 3),
                    "cache_tok_s": round(n_cmp / t_cache, 1), "full_prefix_tok_s": round(n_cmp / t_full, 1),
                    "speedup": round(t_full / t_cache, 2), "tokens_equal": bool(torch.equal(cached, full))},
        "long_generation": {"seqs": long_tokens.shape[0], "seq_len": long_tokens.shape[1],
                            "cache_s": round(t_long, 3), "cache_tok_s": round(long_tokens.numel() / t_long, 1)},
        "hessians": {"tokens": long_tokens.numel(), "matrices": len(h32), "distinct": len(list(distinct)),
                     "fp32_s": round(t_h32, 3), "fp32_tok_s": round(long_tokens.numel() / t_h32, 1)},
    }
    c, g, h = row["compare"], row["long_generation"], row["hessians"]
    print(f"[{name}] {c['seqs']}x{c['seq_len']}: cache {c['cache_tok_s']} tok/s, full prefix "
          f"{c['full_prefix_tok_s']} tok/s -> {c['speedup']}x (tokens equal: {c['tokens_equal']})")
    print(f"[{name}] cache generation {g['seqs']}x{g['seq_len']}: {g['cache_s']} s ({g['cache_tok_s']} tok/s)")
    print(f"[{name}] Hessians {h['tokens']} tokens, {h['matrices']} matrices ({h['distinct']} distinct): "
          f"{h['fp32_s']} s")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=8, help="sequences in the cache vs full-prefix comparison")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence in the comparison")
    ap.add_argument("--long-seqs", type=int, default=8, help="sequences of the model's seq_len (cache, Hessians)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for generation (CUDA only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    if BUNDLED.is_file():
        ckpt = torch.load(BUNDLED, weights_only=True)
        rows.append(bench_model("bundled", build_model(ckpt["model"], ckpt.get("config")), args, device))
    torch.manual_seed(args.seed)
    rows.append(bench_model("baseline-random-9x512", GPT(GPTConfig()), args, device))
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "threads": args.threads, "torch": torch.__version__, "bf16": args.bf16, "results": rows}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
