"""The one prepared GPU check (benchmarks/gpu_check.sh runs it): on a single CUDA GPU, within about 8 minutes,
what the CPU here cannot measure. Writes benchmarks/gpu_<device>.json (and a copy under $OUT when set).

1. kernel_speed.py: the dequant kernels' GB/s and the fused matmul, checked against the torch references.
2. The records' shape (11x512, MLP 3x, vocab 8192, ~30 M weights, synthetic: checkpoints.synthetic_state_dict)
   through `golfquant.quantize` with budget 16,000,000 and the default calibration (64 x 2048 self-generated
   tokens) on the GPU: wall seconds per stage, peak GPU memory, the artifact's bytes.
3. `roundtrip-eval` of the bundled model's --budget artifact on 1,048,576 validation tokens (the bundled split
   repeated to that length: nothing can be downloaded there) with --device cuda and --device cpu: wall seconds
   and the val_bpb difference (bf16 autocast on CUDA against fp32 on the CPU: agreement within 0.01 bpb).
4. 20 training steps of the baseline preset on the bundled shards: tokens/s.

Every part runs in its own process with a time limit, and a part that fails is recorded with its error.

    PYTHONPATH=. python benchmarks/gpu_check.py
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from checkpoints import RECORD_SHAPE, ROOT, synthetic_state_dict

EVAL_TOKENS = 1 << 20
BPB_AGREEMENT = 0.01


def run(label: str, argv: list[str], timeout: int, results: dict, env: dict | None = None) -> str | None:
    """argv in a subprocess from the repository root; its stdout, or None with the failure recorded."""
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    except subprocess.TimeoutExpired:
        results[label] = {"error": f"timed out after {timeout} s"}
        return None
    seconds = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        results[label] = {"error": done.stderr[-2000:], "seconds": seconds}
        return None
    results.setdefault(label, {})["seconds"] = seconds
    return done.stdout


def record_shape_quantize(work: Path) -> None:
    """Part 2, in its own process: prints one JSON line."""
    import golfquant
    from golfquant.model import GPTConfig
    from golfquant.options import QuantizeOptions

    state_dict = synthetic_state_dict(**RECORD_SHAPE)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = golfquant.quantize(state_dict, QuantizeOptions(budget=16_000_000, device="cuda"),
                                config=GPTConfig(**RECORD_SHAPE).to_dict())
    wall = time.perf_counter() - start
    print(json.dumps({"weights": sum(t.numel() for t in state_dict.values()), "wall_seconds": round(wall, 1),
                      "stages": {k: round(v, 1) for k, v in result.budget.seconds.items()},
                      "calibration": result.meta.get("calibration"), "total_bytes": result.total_bytes,
                      "chosen_plan": result.budget.chosen,
                      "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20)}))


def long_val_shard(path: Path) -> None:
    from golfquant.data import default_val_pattern, load_tokens, write_shard

    tokens = load_tokens(default_val_pattern()).numpy()
    write_shard(path, np.resize(tokens, EVAL_TOKENS + 1))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--record-shape":
        record_shape_quantize(Path(sys.argv[2]))
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False)")
    name = re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "commit": subprocess.run(
                         ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()}
    py = sys.executable
    cli = [py, "-m", "golfquant_cli.main"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        kernels_json = work / "kernels.json"
        if run("kernel_speed", [py, "benchmarks/kernel_speed.py", "--out", str(kernels_json)], 120, results):
            results["kernel_speed"]["results"] = json.loads(kernels_json.read_text())

        out = run("record_shape_quantize", [py, __file__, "--record-shape", str(work)], 300, results)
        if out:
            results["record_shape_quantize"] |= json.loads(out.strip().splitlines()[-1])

        art, val = work / "bundled.gqa", work / "fineweb_val_000000.bin"
        long_val_shard(val)
        if run("bundled_quantize", [*cli, "quantize", "--budget", "1.5e6", "--device", "cuda", "--no-cache",
                                    "--json", "-o", str(art)], 120, results):
            bpb = {}
            for device in ("cuda", "cpu"):
                label = f"roundtrip_{device}"
                out = run(label, [*cli, "roundtrip-eval", str(art), "--val", str(val), "--device", device, "--json"],
                          240, results, env={"GOLFQUANT_THREADS": str(os.cpu_count() or 1)})
                if out:
                    res = json.loads(out.strip().splitlines()[-1])
                    results[label] |= {"tokens": res["tokens"], "val_bpb": res["quantized"]["val_bpb"],
                                       "float_val_bpb": res["float"]["val_bpb"]}
                    bpb[device] = res["quantized"]["val_bpb"]
            if len(bpb) == 2:
                results["roundtrip_agreement"] = {"difference": abs(bpb["cuda"] - bpb["cpu"]),
                                                  "within": BPB_AGREEMENT,
                                                  "agree": abs(bpb["cuda"] - bpb["cpu"]) <= BPB_AGREEMENT}

        out = run("train_baseline_20_steps", [*cli, "train", "--preset", "baseline", "--steps", "20", "--set",
                                              "val_every=0", "--json", "-o", str(work / "train.pt")], 240, results)
        if out:
            train = json.loads(out[out.index("{"):])["result"]
            results["train_baseline_20_steps"] |= {k: train[k] for k in ("steps", "tokens_per_s", "train_seconds",
                                                                         "val_bpb")}
    text = json.dumps(results, indent=1) + "\n"
    path = ROOT / "benchmarks" / f"gpu_{name}.json"
    path.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
