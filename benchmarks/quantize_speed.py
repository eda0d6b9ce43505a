"""Whole `quantize --method gptq --calib selfgen --clip sdclip` on a baseline-size model, stage by stage.

Model: a randomly initialized baseline GPT (9 x 512, vocab 1024, seq_len 1024) whose matrices are drawn
N(0, 1/fan_in) like trained weights. For each thread count (default 2, then 1) this runs
1. the library's quantize path end to end (`pipeline.quantize_checkpoint`: calibration tokens, Hessian capture,
   GPTQ of every matrix, artifact write) and reads its stage times from the summary (calibration meta,
   per-matrix reports), the artifact write being the rest of the wall time;
2. the one-pass calibration `calib.calibration_hessians` (Hessians collected while generating), checked
   against the pipeline's tokens and Hessians, and the total the pipeline would take using it.
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
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from golfquant.atomic import atomic_write_text  # noqa: E402
from golfquant.calib import CalibConfig, calibration_hessians, capture_hessians, generate_tokens  # noqa: E402
from golfquant.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from golfquant.factory import build_model  # noqa: E402
from golfquant.model import GPT, GPTConfig  # noqa: E402
from golfquant.pipeline import QuantizeOptions, quantize_checkpoint  # noqa: E402
from golfquant.plan import PlanOptions  # noqa: E402


def random_baseline_checkpoint(path: Path, seed: int) -> None:
    config = GPTConfig()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    sd = {name: (torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5 if t.dim() == 2 else t.detach().clone())
          for name, t in GPT(config).state_dict().items()}
    save_checkpoint(path, sd, config.to_dict())


def quantize_run(ckpt: Path, out: Path, calib: CalibConfig, clip: str) -> dict:
    opts = QuantizeOptions(plan=PlanOptions(mlp="int6", attn="int6", embed="int8"), method="gptq", clip=clip,
                           calib=calib)
    start, cpu = time.perf_counter(), time.process_time()
    summary = quantize_checkpoint(ckpt, out, opts)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    cal = summary["meta"]["calibration"]
    reports = summary["reports"]
    gptq_s = sum(r["seconds"] for r in reports)
    slowest = max(reports, key=lambda r: r["seconds"])
    return {"wall_s": round(wall, 2), "process_cpu_s": round(cpu, 2), "generate_s": cal["generate_seconds"], "hessians_s": cal["hessian_seconds"],
            "gptq_s": round(gptq_s, 2), "matrices": len(reports),
            "slowest_matrix": {"name": slowest["name"], "seconds": round(slowest["seconds"], 3)},
            "rest_s": round(wall - cal["generate_seconds"] - cal["hessian_seconds"] - gptq_s, 2),
            "artifact_bytes": summary["artifact_bytes"]}


def one_pass_calibration(ckpt: Path, calib: CalibConfig) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of calib.calibration_hessians."""
    c = load_checkpoint(ckpt)
    model = build_model(c.state_dict, c.config).eval()
    start, cpu = time.perf_counter(), time.process_time()
    calibration_hessians(model, calib)
    return time.perf_counter() - start, time.process_time() - cpu


def bench_threads(threads: int, ckpt: Path, tmp: Path, args: argparse.Namespace) -> dict:
    torch.set_num_threads(threads)
    calib = CalibConfig(seqs=args.seqs, batch=args.batch, seed=args.seed)
    load_before = os.getloadavg()[0]
    pipe = quantize_run(ckpt, tmp / f"t{threads}.gq", calib, args.clip)
    fused_s, fused_cpu = one_pass_calibration(ckpt, calib)
    row = {"threads": threads, "load_avg_1min_before": round(load_before, 2), "pipeline": pipe,
           "one_pass_calibration_s": round(fused_s, 2), "one_pass_calibration_cpu_s": round(fused_cpu, 2),
           "total_with_one_pass_s": round(fused_s + pipe["gptq_s"] + pipe["rest_s"], 2)}
    print(f"threads={threads} (load avg {load_before:.1f}): generate {pipe['generate_s']} s | Hessians "
          f"{pipe['hessians_s']} s | GPTQ {pipe['gptq_s']} s for {pipe['matrices']} matrices (slowest "
          f"{pipe['slowest_matrix']['name']} {pipe['slowest_matrix']['seconds']} s) | write+rest {pipe['rest_s']} s"
          f" | quantize total {pipe['wall_s']} s ({pipe['process_cpu_s']} CPU-s)")
    print(f"threads={threads}: one-pass calibration (generation + Hessians) {row['one_pass_calibration_s']} s ({fused_cpu:.1f} CPU-s) "
          f"-> quantize total with it {row['total_with_one_pass_s']} s")
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
