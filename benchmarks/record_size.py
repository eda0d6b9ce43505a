"""What `quantize --budget` costs on this CPU, per stage, from the bundled model up to the records' size, and what
loading its artifact costs.

Three shapes: the bundled 4x320 (3.6 M parameters, its real checkpoint), the challenge baseline 9x512 (17 M) and
the SP8192 records' 11x512 with MLP 3x and vocab 8192 (~30 M), the last two synthetic
(checkpoints.synthetic_state_dict). Each runs in a fresh process on one thread, with the default calibration
(64 self-generated sequences of the model's seq_len) and the budget the challenge gives, 16,000,000 bytes, or
--bytes-per-parameter x parameters where that is smaller (the bundled model, which fits whole in 16 MB):
* `golfquant.quantize(..., budget)` from nothing, then again with its cached calibration and measurement: wall
  seconds per stage as golfquant.budget reports them (calibration = self-generation with the Hessians collected
  in the same pass; sensitivity; measurement = every candidate quantized (GPTQ) and its damage; solve and
  confirm = the allocation; encode), and the seconds after calibration;
* the process's peak RSS, and the peak seen (sampled every 50 ms) under the last stage the progress callback named;
* `load_artifact` and the exported loader (`export-loader` for the artifact's codecs) on the written artifact,
  best of --reps.

Then the bundled model under `torchrun --nproc_per_node=2` (gloo) against one process, each in fresh processes:
`quantize --budget` (wall seconds, and whether the artifacts are byte-identical) and `roundtrip-eval` on
--eval-tokens validation tokens (wall seconds and the val_bpb difference). Two processes on a 2-core machine
shared with other jobs: the wall times say what the split costs here, not what 8 GPUs give.

Before all that: `golfquant quantize --budget 1.5e6` on the bundled model as a user types it (default calibration,
no cache), with this checkout and with the commit before the measured allocation (--before, checked out in a
temporary worktree), one after the other: the ratio of the two.

    .venv/bin/python benchmarks/record_size.py      # ~1 hour here; writes benchmarks/record_size.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from checkpoints import BASELINE_SHAPE, BUNDLED, RECORD_SHAPE, ROOT, synthetic_state_dict

OUT = Path(__file__).with_suffix(".json")
SHAPES = {"bundled 4x320": None, "baseline 9x512": BASELINE_SHAPE, "records 11x512 MLP3x vocab 8192": RECORD_SHAPE}
CAP = 16_000_000
STAGES = ("calibration", "sensitivity", "measurement", "solve", "confirm", "encode")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GOLFQUANT_THREADS": "1"}


def rss_mb() -> int:
    """This process's resident set now (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))


def best_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(min(times), 3)


def child(shape_json: str, bytes_per_parameter: float, reps: int, work: str) -> None:
    """One shape: two `--budget` runs, then the loads of the artifact; prints one JSON line."""
    import torch

    import golfquant
    from golfquant.artifact import load_artifact
    from golfquant.checkpoint import load_checkpoint, save_checkpoint
    from golfquant.export import artifact_codecs, loader_source
    from golfquant.model import GPTConfig
    from golfquant.options import QuantizeOptions

    torch.set_num_threads(1)
    shape = json.loads(shape_json)
    if shape is None:
        path = BUNDLED
    else:
        path = Path(work) / "model.pt"
        save_checkpoint(path, synthetic_state_dict(**shape), GPTConfig(**shape).to_dict())
    ckpt = load_checkpoint(path)
    params = sum(t.numel() for t in ckpt.state_dict.values())
    budget = min(CAP, int(bytes_per_parameter * params))
    artifact = Path(work) / "a.gqa"
    out = {"parameters": params, "budget": budget, "runs": []}
    stage = ["load"]  # the last stage the progress callback named; the sampler charges the RSS it sees to it
    peaks: dict[str, int] = {}

    def sample_rss() -> None:
        while True:
            peaks[stage[0]] = max(peaks.get(stage[0], 0), rss_mb())
            time.sleep(0.05)

    threading.Thread(target=sample_rss, daemon=True).start()
    for run in ("first", "cached"):
        start = time.perf_counter()
        result = golfquant.quantize(ckpt.state_dict, QuantizeOptions(budget=budget), config=ckpt.config,
                                    cache=Path(work) / "a", progress=lambda name, *_: stage.__setitem__(0, name))
        result.save(artifact)
        report = result.budget
        stages = {k: round(v, 1) for k, v in report.seconds.items()}
        out["runs"].append({"run": run, "wall_seconds": round(time.perf_counter() - start, 1), "stages": stages,
                            "after_calibration_seconds": round(sum(v for k, v in report.seconds.items()
                                                                   if k != "calibration"), 1),
                            "candidates": report.measurement.candidates, "chosen_plan": report.chosen,
                            "total_bytes": result.total_bytes})
        stage[0] = f"after the {run} run"
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out["peak_rss_mb_by_stage"] = peaks
    namespace: dict = {}
    exec(compile(loader_source(True, artifact_codecs(artifact)), "<exported loader>", "exec"), namespace)
    out["load_artifact_seconds"] = best_seconds(lambda: load_artifact(artifact), reps)
    out["exported_loader_seconds"] = best_seconds(lambda: namespace["load_artifact"](str(artifact)), reps)
    print(json.dumps(out))


def cli(nproc: int, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    command = ["-m", "golfquant_cli.main", *args]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *command]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)
    return round(time.perf_counter() - start, 1), done


def torchrun_runs(eval_tokens: int) -> dict:
    """The bundled model's `quantize --budget` and `roundtrip-eval`, one process against two."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        arts = {n: Path(tmp) / f"{n}.gqa" for n in (1, 2)}
        for n in (1, 2):
            out[f"quantize_budget_seconds_{n}"], _ = cli(n, "quantize", "--budget", "1.5e6", "--no-cache", "--json",
                                                         "-o", str(arts[n]))
        out["artifacts_identical"] = arts[1].read_bytes() == arts[2].read_bytes()
        bpb = {}
        for n in (1, 2):
            seconds, done = cli(n, "roundtrip-eval", str(arts[1]), "--max-tokens", str(eval_tokens), "--json")
            out[f"roundtrip_seconds_{n}"] = seconds
            bpb[n] = json.loads(done.stdout.strip().splitlines()[-1])["quantized"]["val_bpb"]
        out["eval_tokens"] = eval_tokens
        out["val_bpb_difference"] = abs(bpb[1] - bpb[2])
    return out


def bundled_command_seconds(before: str) -> dict:
    """Wall seconds of `quantize --budget 1.5e6` on the bundled model: this checkout (default method) and the commit
    `before` (its default method rtn, and --method gptq)."""
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
                               cwd=cwd, env=ENV | {"PYTHONPATH": str(cwd)}, check=True, capture_output=True)
                out[label] = round(time.perf_counter() - start, 1)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
    out["ratio_to_before_default"] = round(out["this checkout"] / out["before (rtn, its default)"], 2)
    out["ratio_to_before_gptq"] = round(out["this checkout"] / out["before --method gptq"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="316bd35", help="the commit before issue 11's measured allocation")
    ap.add_argument("--bytes-per-parameter", type=float, default=0.45,
                    help="budget = min(16,000,000, this x parameters)")
    ap.add_argument("--reps", type=int, default=3, help="loads of each artifact (the best is kept)")
    ap.add_argument("--eval-tokens", type=int, default=262144, help="validation tokens of the torchrun roundtrip")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, from: " + ", ".join(SHAPES))
    ap.add_argument("--update", action="store_true",
                    help="run only --shapes, keeping everything else of record_size.json")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], float(args.child[1]), int(args.child[2]), args.child[3])
        return
    if args.update:  # the other parts and shapes as record_size.json has them
        kept = json.loads(OUT.read_text())
        command, torchrun, results = kept["bundled_command"], kept["torchrun"], kept["shapes"]
    else:
        command = bundled_command_seconds(args.before)
        print(json.dumps(command), flush=True)
        torchrun = torchrun_runs(args.eval_tokens)
        print(json.dumps(torchrun), flush=True)
        results = {}
    for label in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as work:
            cmd = [sys.executable, __file__, "--child", json.dumps(SHAPES[label]), str(args.bytes_per_parameter),
                   str(args.reps), work]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=ENV)
            results[label] = json.loads(res.stdout.strip().splitlines()[-1])
            print(label, json.dumps(results[label]), flush=True)
    OUT.write_text(json.dumps({"bundled_command": command, "torchrun": torchrun, "cap": CAP,
                               "bytes_per_parameter": args.bytes_per_parameter, "shapes": results}, indent=1) + "\n")
    print("| shape | parameters | budget | " + " | ".join(STAGES) + " | after calibration | cached run | peak RSS | "
          "load_artifact | exported loader |")
    for label, r in results.items():
        first, cached = r["runs"]
        stages = " | ".join(f"{first['stages'].get(k, 0):.1f}" for k in STAGES)
        print(f"| {label} | {r['parameters']:,} | {r['budget']:,} | {stages} | {first['after_calibration_seconds']} | "
              f"{cached['wall_seconds']} | {r['peak_rss_mb']:,} MB | {r['load_artifact_seconds']} | "
              f"{r['exported_loader_seconds']} |")


if __name__ == "__main__":
    main()
