"""What `quantize --budget` costs per stage, and how it grows with the model: issue 11's proportionate cost.

Three shapes: the bundled 4x320 (3.6 M parameters, its real checkpoint), the challenge baseline 9x512 (17 M) and
the SP8192 records' 11x512 with MLP 3x and vocab 8192 (~30 M), the last two synthetic
(checkpoints.synthetic_state_dict). Each runs in a fresh process (one thread): `quantize --budget` from nothing,
then the same command again with the cached calibration and measurement. Per run: wall seconds per stage
(golfquant.budget's summary: calibration, sensitivity, measurement, solve, confirm, encode), the measurement's
tensor x candidate count, and the process's peak RSS. The calibration is --calib-seqs sequences of the model's
seq_len (default 8, not the 64 of a real run: generation is the calibration's cost, not the measurement's, and
the Hessians' size does not depend on it).

Before that, in the same run: `golfquant quantize --budget 1.5e6` on the bundled model as a user types it (default
calibration, no cache), with this checkout and with the allocator before issue 11 (--before, a git commit,
checked out in a temporary worktree), each in a fresh process, one after the other: the ratio of the two.

    .venv/bin/python benchmarks/budget_cost.py      # writes benchmarks/budget_cost.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from checkpoints import BASELINE_SHAPE, BUNDLED, RECORD_SHAPE, ROOT, synthetic_state_dict

OUT = Path(__file__).with_suffix(".json")
SHAPES = {"bundled 4x320": None, "baseline 9x512": BASELINE_SHAPE, "records 11x512 MLP3x vocab 8192": RECORD_SHAPE}


def child(shape_json: str, budget_fraction: float, calib_seqs: int, work: str) -> None:
    """One shape: the checkpoint, then two `--budget` runs; prints one JSON line."""
    import torch

    from golfquant.api import quantize_checkpoint
    from golfquant.calib import CalibConfig
    from golfquant.checkpoint import load_checkpoint, save_checkpoint
    from golfquant.model import GPTConfig
    from golfquant.options import QuantizeOptions

    torch.set_num_threads(1)
    shape = json.loads(shape_json)
    if shape is None:
        ckpt = BUNDLED
    else:
        ckpt = Path(work) / "model.pt"
        save_checkpoint(ckpt, synthetic_state_dict(**shape), GPTConfig(**shape).to_dict())
    params = sum(t.numel() for t in load_checkpoint(ckpt).state_dict.values())
    budget = int(budget_fraction * params)
    out = {"parameters": params, "budget": budget, "runs": []}
    for run in ("first", "cached"):
        start = time.perf_counter()
        s = quantize_checkpoint(ckpt, Path(work) / "a.gqa", QuantizeOptions(calib=CalibConfig(seqs=calib_seqs),
                                                                            budget=budget))
        out["runs"].append({"run": run, "wall_seconds": round(time.perf_counter() - start, 1),
                            "stages": s["seconds"], "candidates": s["measurement"]["candidates"],
                            "chosen_plan": s["chosen_plan"], "total_bytes": s["total_bytes"]})
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out))


def bundled_command_seconds(before: str) -> dict:
    """Wall seconds of `quantize --budget 1.5e6` on the bundled model: this checkout (default method) and the commit
    `before` (its default method rtn, and --method gptq)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "GOLFQUANT_THREADS": "1"}
    out = {"before_commit": before}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), before], cwd=ROOT, check=True)
        try:
            runs = {"this checkout": (ROOT, ["--no-cache"]), "before (rtn, its default)": (tree, []),
                    "before --method gptq": (tree, ["--method", "gptq"])}
            for label, (cwd, flags) in runs.items():
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "golfquant_cli.main", "quantize", "--budget", "1.5e6", *flags,
                                "--json", "-o", str(Path(tmp) / "a.gqa")],
                               cwd=cwd, env=env, check=True, capture_output=True)
                out[label] = round(time.perf_counter() - start, 1)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
    out["ratio_to_before_default"] = round(out["this checkout"] / out["before (rtn, its default)"], 2)
    out["ratio_to_before_gptq"] = round(out["this checkout"] / out["before --method gptq"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-seqs", type=int, default=8)
    ap.add_argument("--before", default="316bd35", help="the commit before issue 11's measured allocation")
    ap.add_argument("--bytes-per-parameter", type=float, default=0.45, help="budget = this x parameters")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], float(args.child[1]), int(args.child[2]), args.child[3])
        return
    command = bundled_command_seconds(args.before)
    print(json.dumps(command), flush=True)
    results = {}
    for label, shape in SHAPES.items():
        with tempfile.TemporaryDirectory() as work:
            cmd = [sys.executable, __file__, "--child", json.dumps(shape), str(args.bytes_per_parameter),
                   str(args.calib_seqs), work]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
            results[label] = json.loads(res.stdout.strip().splitlines()[-1])
            print(label, json.dumps(results[label]), flush=True)
    OUT.write_text(json.dumps({"bundled_command": command, "calib_seqs": args.calib_seqs, "shapes": results},
                              indent=1) + "\n")
    print("| shape | parameters | candidates | " + " | ".join(
        ("calibration", "sensitivity", "measurement", "solve", "confirm", "encode")) + " | first run | cached run | peak RSS |")
    for label, r in results.items():
        first, cached = r["runs"]
        stages = " | ".join(f"{first['stages'].get(k, 0):.1f}" for k in
                            ("calibration", "sensitivity", "measurement", "solve", "confirm", "encode"))
        print(f"| {label} | {r['parameters']:,} | {first['candidates']:,} | {stages} | {first['wall_seconds']} s | "
              f"{cached['wall_seconds']} s | {r['peak_rss_mb']:,} MB |")


if __name__ == "__main__":
    main()
