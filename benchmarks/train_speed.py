"""Training throughput on this machine's CPU: one process vs two gloo processes under torchrun.

Every number is measured in this run. For each config, `golfquant train` runs once as one process and once
as `torchrun --nproc_per_node=2` (gloo), one torch thread per process, with the SAME global batch (two
micro-batches per step: one process accumulates both, two processes take one each) and the same steps:
* tiny: the bundled preset (4 x 320, seq 256) at its own batch of 4,096 tokens;
* baseline: the challenge's 9 x 512 (seq 1024) with the batch REDUCED to 4,096 tokens (2 x 2 sequences of
  1,024) instead of 524,288, so that a step takes seconds on a CPU.
Tokens/s is the global batch over a step's time, as the trainer logs it; the reported figure is the median over
the steps after the first (the first pays for allocations and lazy imports). The validation split is cut to
2 sequences so that the end-of-run eval stays short (it is outside the timed steps anyway). The machine is
shared and noisy: the load average before and after is recorded, and the 2-process/1-process ratio compares
two runs made one after the other.

    .venv/bin/python benchmarks/train_speed.py          # ~3-4 minutes; writes benchmarks/train_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from golfquant.atomic import atomic_write_text  # noqa: E402
from golfquant.checkpoint import load_checkpoint  # noqa: E402
from golfquant.data import default_data_dir, load_tokens, write_shard  # noqa: E402

CONFIGS = {
    "tiny": {"preset": "tiny", "steps": 6, "sets": ["grad_accum_steps=2"]},
    "baseline": {"preset": "baseline", "steps": 3,
                 "sets": ["batch_tokens=4096", "grad_accum_steps=2", "max_wallclock_seconds=0"]},
}


def make_data(root: Path, val_tokens: int) -> Path:
    bundled = default_data_dir()
    for name in ("fineweb_train_000000.bin", "tokenizer.model"):
        (root / name).symlink_to(bundled / name)
    write_shard(root / "fineweb_val_000000.bin", load_tokens(str(bundled / "fineweb_val_*.bin"), val_tokens).numpy())
    return root


def run(config: dict, nproc: int, data: Path, out: Path) -> dict:
    sets = [a for s in [*config["sets"], "val_every=0"] for a in ("--set", s)]
    command = ["-m", "golfquant_cli.main", "train", "--preset", config["preset"], "--steps", str(config["steps"]),
               "--data", str(data), *sets, "-o", str(out), "--json"]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GOLFQUANT_THREADS": "1"}
    done = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    report = json.loads(done.stdout[done.stdout.index("{"):])
    per_step = [round(e["tokens_per_s"], 1) for e in report["log"]]
    return {
        "processes": nproc, "batch_tokens": report["train"]["batch_tokens"], "steps": len(per_step),
        "tokens_per_s_per_step": per_step, "tokens_per_s_median_after_first": round(statistics.median(per_step[1:]), 1),
        "amp": load_checkpoint(out).extra["amp"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "train_speed.json")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "threads_per_process": 1,
               "loadavg_before": [round(x, 2) for x in os.getloadavg()], "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), val_tokens=2 * 1024 + 1)
        for name in args.configs:
            one = run(CONFIGS[name], 1, data, Path(tmp) / f"{name}1.pt")
            two = run(CONFIGS[name], 2, data, Path(tmp) / f"{name}2.pt")
            ratio = two["tokens_per_s_median_after_first"] / one["tokens_per_s_median_after_first"]
            results["configs"][name] = {"one_process": one, "two_processes": two, "ratio_2p_over_1p": round(ratio, 3)}
            print(f"{name}: 1 process {one['tokens_per_s_median_after_first']:,.0f} tok/s, 2 processes "
                  f"{two['tokens_per_s_median_after_first']:,.0f} tok/s (x{ratio:.2f})", flush=True)
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
