"""Whole `quantize --method gptq --calib selfgen --clip sdclip` on a baseline-size model, stage by stage.

Model: a randomly initialized baseline GPT (9 x 512, vocab 1024, seq_len 1024) whose matrices are drawn
N(0, 1/fan_in) like trained weights. For each thread count (default 2, then 1) this runs
the library's quantize path stage by stage: `pipeline.calibrate` (self-generated tokens with the Hessians collected
during KV-cache generation), `pipeline.quantize_with_plan` (GPTQ of every matrix), `artifact.write_artifact`.
A short check first confirms that the one-pass calibration gives the same tokens as plain generation and the
Hessians of a separate capture pass.
Nothing is extrapolated. Other processes on the machine slow every number; the load average and the process's
CPU seconds (time.process_time, all threads) are recorded beside the wall times.

    .venv/bin/python benchmarks/quantize_speed.py                      # 64 x 1024 tokens, threads 2 and 1
    .venv/bin/python benchmarks/quantize_speed.py --seqs 8 --threads 1  # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from golfquant.artifact import write_artifact
from golfquant.atomic import atomic_write_text
from golfquant.calib import CalibConfig, calibration_hessians, capture_hessians, generate_tokens
from golfquant.checkpoint import load_checkpoint, save_checkpoint
from golfquant.factory import build_model
from golfquant.model import GPT, GPTConfig
from golfquant.options import QuantizeOptions
from golfquant.pipeline import calibrate, quantize_with_plan
from golfquant.plan import PlanOptions


def random_baseline_checkpoint(path: Path, seed: int) -> None:
    config = GPTConfig()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    sd = {name: (torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5 if t.dim() == 2 else t.detach().clone())
          for name, t in GPT(config).state_dict().items()}
    save_checkpoint(path, sd, config.to_dict())


def bench_threads(threads: int, ckpt: Path, tmp: Path, args: argparse.Namespace) -> dict:
    """The library's quantize path stage by stage: calibration (tokens + Hessians), GPTQ of every matrix, write."""
    torch.set_num_threads(threads)
    opts = QuantizeOptions(plan=PlanOptions(mlp="int6", attn="int6", embed="int8"), method="gptq", clip=args.clip,
                           calib=CalibConfig(seqs=args.seqs, batch=args.batch, seed=args.seed))
    load_before = os.getloadavg()[0]
    ck = load_checkpoint(ckpt)
    t0, cpu0 = time.perf_counter(), time.process_time()
    calibration = calibrate(ck, opts)
    t1 = time.perf_counter()
    result = quantize_with_plan(ck, opts, calibration=calibration)
    t2 = time.perf_counter()
    info = write_artifact(tmp / f"t{threads}.gq", result.tensors, result.plan, result.meta)
    t3, cpu = time.perf_counter(), time.process_time() - cpu0
    slowest = max(result.reports, key=lambda r: r.seconds)
    row = {"threads": threads, "load_avg_1min_before": round(load_before, 2),
           "calibration_s": round(t1 - t0, 2), "gptq_s": round(t2 - t1, 2), "matrices": len(result.reports),
           "slowest_matrix": {"name": slowest.name, "seconds": round(slowest.seconds, 3)},
           "write_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2), "process_cpu_s": round(cpu, 2),
           "artifact_bytes": info.total_bytes}
    print(f"threads={threads} (load avg {load_before:.1f}): calibration {row['calibration_s']} s | GPTQ "
          f"{row['gptq_s']} s for {row['matrices']} matrices (slowest {slowest.name} {slowest.seconds:.2f} s) | "
          f"write {row['write_s']} s | total {row['total_s']} s ({row['process_cpu_s']} CPU-s)", flush=True)
    return row


def agreement(ckpt: Path, seqs: int, seed: int) -> dict:
    """One-pass vs two-pass calibration on a few sequences: same tokens, Hessians equal up to rounding."""
    c = load_checkpoint(ckpt)
    model = build_model(c.state_dict, c.config).eval()
    calib = CalibConfig(seqs=seqs, batch=seqs, seed=seed, seq_len=128)
    tokens, fused = calibration_hessians(model, calib)
    same = bool(torch.equal(tokens, generate_tokens(model, calib)))
    ref = capture_hessians(model, tokens, batch=seqs)
    rel = max(float((fused[k].H - ref[k].H).norm() / ref[k].H.norm()) for k in ref)
    return {"seqs": seqs, "seq_len": 128, "tokens_equal": same, "max_rel_frobenius_diff": float(f"{rel:.3g}")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="sequences generated (and captured) together")
    ap.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    ap.add_argument("--clip", default="sdclip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ckpt = tmp / "baseline_random.pt"
        random_baseline_checkpoint(ckpt, args.seed)
        torch.set_num_threads(1)
        check = agreement(ckpt, 4, args.seed)
        print(f"one-pass vs two-pass calibration (4 x 128): tokens equal {check['tokens_equal']}, Hessians max "
              f"rel. Frobenius difference {check['max_rel_frobenius_diff']}")
        for threads in (int(t) for t in args.threads.split(",")):
            rows.append(bench_threads(threads, ckpt, tmp, args))
    report = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "model": "random baseline 9x512 vocab 1024 seq_len 1024", "plan": "int6 mlp/attn, int8 embed",
              "clip": args.clip, "calib": {"seqs": args.seqs, "seq_len": 1024, "batch": args.batch},
              "one_pass_agreement": check, "results": rows}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
