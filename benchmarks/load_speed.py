"""Artifact load speed, one thread: every rANS section decoded together against one section at a time.

The loader runs inside the challenge's timed evaluation, and rANS decoding is most of its cost: an interleaved
stream is decoded with one numpy step per lane step (8,192 steps for a large tensor), so decoding section after
section costs about 8,192 steps per tensor, where `golfquant.codec.rans.decode_codes_many` steps the lanes of every
section at once (and decodes the small row/column side streams in plain Python).

For each model an artifact is written without calibration (RTN, SDClip, int6 on every matrix, int8 on the
embedding): the SP8192 records' shape (11 x 512, MLP 3x, vocab 8192, ~30 M weights) and the challenge's baseline
shape (9 x 512, vocab 1024), both synthetic with trained-like statistics (benchmarks/checkpoints.py), and the
bundled 4 x 320 checkpoint. Then, with torch.set_num_threads(1), each path `--reps` times in turn (best kept):
* `load_artifact`: this tree, the lanes of every rANS section decoded together;
* `load_artifact`, one section at a time: this tree's decoder through the codes-codec registry's per-section path;
* `load_artifact` with the rANS decoder of BASE (the commit before the batched decoder, read with `git show`);
* the exported loader (`golfquant export-loader` for the artifact's codecs) of this tree and of BASE.
Every path must give the same state_dict bit for bit (checked: the script exits 1 otherwise). The machine may be
shared: the 1-minute load average is recorded before and after each model; ratios are of times from one run.

    .venv/bin/python benchmarks/load_speed.py                          # record, baseline, bundled; 3 reps
    .venv/bin/python benchmarks/load_speed.py --models bundled --reps 5 --out /tmp/load.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from checkpoints import BASELINE_SHAPE, BUNDLED, RECORD_SHAPE, synthetic_state_dict  # noqa: E402

import golfquant  # noqa: E402
from golfquant.artifact import artifact_sizes, load_artifact  # noqa: E402
from golfquant.atomic import atomic_write_text  # noqa: E402
from golfquant.checkpoint import load_checkpoint  # noqa: E402
from golfquant.codec import CODES_CODECS, CodesCodec, rans  # noqa: E402
from golfquant.export import artifact_codecs, loader_source, packed_loader  # noqa: E402
from golfquant.plan import PlanOptions  # noqa: E402

BASE = "771a2ce0a28b2c5cfb5dc935c28eb768cdfa9185"  # the last commit with the per-section rANS decoder
MODELS = {"record": "synthetic 11x512, MLP 3x, vocab 8192 (benchmarks/checkpoints.RECORD_SHAPE)",
          "baseline": "synthetic 9x512, MLP 2x, vocab 1024 (benchmarks/checkpoints.BASELINE_SHAPE)",
          "bundled": "bundled 4x320 checkpoint (golfquant/assets/model.pt)"}
OPTIONS = golfquant.QuantizeOptions(method="rtn", clip="sdclip",
                                    plan=PlanOptions(mlp="int6", attn="int6", embed="int8"))


def base_module(path: str, name: str) -> types.ModuleType:
    """The module at `path` as of BASE (it imports today's golfquant for everything else)."""
    source = subprocess.run(["git", "show", f"{BASE}:{path}"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{BASE[:7]}:{path}", "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def rans_decoder(decode):
    """load_artifact with `decode` registered for rANS: any other function than rans.decode_codes is called one
    section at a time."""
    saved = CODES_CODECS["rans"]
    CODES_CODECS["rans"] = CodesCodec(saved.encode, decode)
    try:
        yield
    finally:
        CODES_CODECS["rans"] = saved


def exported(source: str):
    namespace: dict = {}
    exec(compile(source, "<exported loader>", "exec"), namespace)
    return namespace["load_artifact"]


def build(model: str, path: Path) -> dict:
    if model == "bundled":
        ckpt = load_checkpoint(BUNDLED)
        state_dict, config = ckpt.state_dict, ckpt.config
    else:
        state_dict, config = synthetic_state_dict(**(RECORD_SHAPE if model == "record" else BASELINE_SHAPE)), None
    start = time.perf_counter()
    golfquant.quantize(state_dict, OPTIONS, config=config).save(path)
    info = artifact_sizes(path)
    codes = [s for s in info.sections if s.codec == "rans"]
    return {"model": MODELS[model], "weights": sum(t.numel() for t in state_dict.values()),
            "artifact_bytes": info.total_bytes, "rans_sections": len(codes),
            "rans_codes": sum(s.raw_length for s in codes),
            "rans_lanes": sum(rans._lanes(s.raw_length) for s in codes),  # of the sections' main streams, unsplit
            "write_s": round(time.perf_counter() - start, 2)}


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)


def bench(model: str, folder: Path, reps: int, base_rans, base_export) -> dict:
    path = folder / f"{model}.gqa"
    row = build(model, path)
    codecs = artifact_codecs(path)
    this_loader, base_loader = exported(loader_source(True, codecs)), exported(base_export.loader_source(True, codecs))

    def one_at_a_time():
        with rans_decoder(lambda blob, shape, bits: rans.decode_codes(blob, shape, bits)):
            return load_artifact(path)

    def base_decoder():
        with rans_decoder(base_rans.decode_codes):
            return load_artifact(path)

    paths = {"load_artifact": lambda: load_artifact(path), "load_artifact_one_section_at_a_time": one_at_a_time,
             "load_artifact_base_decoder": base_decoder, "exported_loader": lambda: this_loader(str(path)),
             "exported_loader_base": lambda: base_loader(str(path))}
    row["load_avg_1min_before"] = round(os.getloadavg()[0], 2)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    reference, identical = None, True
    for _ in range(reps):
        for name, fn in paths.items():
            start = time.perf_counter()
            state_dict = fn()
            seconds[name].append(time.perf_counter() - start)
            reference = reference or state_dict
            identical &= same(state_dict, reference)
            del state_dict
    row["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    row["identical_state_dicts"] = identical
    row["seconds"] = {name: {"best": round(min(s), 3), "median": round(statistics.median(s), 3),
                             "all": [round(x, 3) for x in s]} for name, s in seconds.items()}
    best = {name: min(s) for name, s in seconds.items()}
    row["speedup"] = {
        "load_artifact_vs_base_decoder": round(best["load_artifact_base_decoder"] / best["load_artifact"], 2),
        "load_artifact_vs_one_section_at_a_time":
            round(best["load_artifact_one_section_at_a_time"] / best["load_artifact"], 2),
        "exported_loader_vs_base": round(best["exported_loader_base"] / best["exported_loader"], 2)}
    print(f"{model} ({row['weights'] / 1e6:.1f} M weights, {row['artifact_bytes']:,} bytes, "
          f"{row['rans_sections']} rANS sections; load avg {row['load_avg_1min_before']} -> "
          f"{row['load_avg_1min_after']}): load_artifact {best['load_artifact']:.3f} s vs "
          f"{best['load_artifact_base_decoder']:.3f} s with BASE's decoder "
          f"(x{row['speedup']['load_artifact_vs_base_decoder']}), "
          f"{best['load_artifact_one_section_at_a_time']:.3f} s one section at a time; exported loader "
          f"{best['exported_loader']:.3f} s vs {best['exported_loader_base']:.3f} s "
          f"(x{row['speedup']['exported_loader_vs_base']}); identical: {identical}", flush=True)
    return row


def loader_bytes(base_export) -> dict:
    out = {}
    for label, codecs in (("all codecs", None), ("rans + brotli", {"rans", "brotli"})):
        base, this = base_export.packed_loader(codecs), packed_loader(codecs)
        out[label] = {"packed_base": base.packed_bytes, "packed": this.packed_bytes,
                      "minified_base": base.raw_bytes, "minified": this.raw_bytes}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="record,baseline,bundled", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    base_rans = base_module("golfquant/codec/rans.py", "base_rans")
    base_export = base_module("golfquant/export.py", "base_export")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models.split(","):
            rows.append({"name": model} | bench(model, Path(folder), args.reps, base_rans, base_export))
    sizes = loader_bytes(base_export)
    print("exported loader bytes (packed / minified): " + "; ".join(
        f"{label} {s['packed_base']:,} -> {s['packed']:,} / {s['minified_base']:,} -> {s['minified']:,}"
        for label, s in sizes.items()))
    report = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": 1,
              "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
              "base_commit": BASE, "plan": "RTN SDClip: int6 mlp/attn, int8 embed", "reps": args.reps,
              "models": rows, "exported_loader_bytes": sizes}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not all(row["identical_state_dicts"] for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
