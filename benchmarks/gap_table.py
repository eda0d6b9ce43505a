"""Roundtrip val_bpb gap of each quantization method on the bundled checkpoint (issue 3's gap table).

For three plans (int4 MLP / int6 attn / int8 embed, int5 everywhere, int6 everywhere) and each method row
(RTN amax/sdclip; GPTQ with amax, pct, mse, sdclip, hsdclip, size clips; GPTQ + sdclip + LQER top 3 rank 4),
the library quantizes the checkpoint (`pipeline.quantize_with_plan`), writes the artifact with the default codec
choice (`artifact.write_artifact`), loads its dequantized weights (`roundtrip.load_quantized_weights`) and evaluates
val_bpb on a prefix of the bundled val split (`evaluate.eval_val_bpb`); the float model is evaluated once on the
same tokens. Calibration (self-generated, 64 sequences of the model's seq_len, seed 0) runs once and every row
reuses its Hessians (`pipeline.calibrate`).

    .venv/bin/python benchmarks/gap_table.py                 # writes gap_table.json and prints a markdown table
    .venv/bin/python benchmarks/gap_table.py --max-tokens 0  # the whole val split
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from golfquant.artifact import write_artifact
from golfquant.atomic import atomic_write_text
from golfquant.calib import CalibConfig
from golfquant.checkpoint import load_checkpoint
from golfquant.data import build_byte_luts, load_tokens
from golfquant.evaluate import eval_val_bpb
from golfquant.factory import build_model
from golfquant.options import QuantizeOptions
from golfquant.pipeline import calibrate, quantize_with_plan
from golfquant.quant.lqer import LqerOptions
from golfquant.roundtrip import load_quantized_weights
from golfquant.plan import PlanOptions

ROOT = Path(__file__).resolve().parents[1]

ASSETS = ROOT / "golfquant" / "assets"
PLANS = {
    "int4 mlp / int6 attn / int8 embed": PlanOptions(mlp="int4", attn="int6", embed="int8"),
    "int5 uniform": PlanOptions(mlp="int5", attn="int5", embed="int5"),
    "int6 uniform": PlanOptions(mlp="int6", attn="int6", embed="int6"),
}
SIZE_BPW = 3.0
ROWS = [  # (label, method, clip, lqer top)
    ("RTN amax", "rtn", "amax", 0),
    ("RTN sdclip", "rtn", "sdclip", 0),
    ("GPTQ amax", "gptq", "amax", 0),
    ("GPTQ pct:99.99", "gptq", "pct:99.99", 0),
    ("GPTQ mse", "gptq", "mse", 0),
    ("GPTQ sdclip", "gptq", "sdclip", 0),
    ("GPTQ hsdclip", "gptq", "hsdclip", 0),
    (f"GPTQ size:{SIZE_BPW}", "gptq", f"size:{SIZE_BPW}", 0),
    ("GPTQ sdclip + LQER(3, r4)", "gptq", "sdclip", 3),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=ASSETS / "model.pt")
    ap.add_argument("--max-tokens", type=int, default=65536, help="val prefix (0 = the whole split)")
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--plans", default=",".join(PLANS), help="comma-separated plan names")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.ckpt)
    model = build_model(ckpt.state_dict, ckpt.config).eval()
    vocab, seq_len = model.config.vocab_size, model.config.seq_len
    luts = build_byte_luts(str(ASSETS / "tokenizer.model"), vocab)
    tokens = load_tokens(str(ASSETS / "fineweb_val_000000.bin"), args.max_tokens + 1 if args.max_tokens else None)
    float_bpb = eval_val_bpb(model, tokens, luts, seq_len).val_bpb
    print(f"float val_bpb {float_bpb:.4f} on {tokens.numel() - 1} tokens")
    start = time.perf_counter()
    calibration = calibrate(ckpt, QuantizeOptions(calib=CalibConfig(seqs=args.calib_seqs)))
    calib_s = time.perf_counter() - start
    print(f"calibration: {args.calib_seqs} x {seq_len} self-generated tokens and Hessians in {calib_s:.1f} s")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for plan_name in args.plans.split(","):
            for label, method, clip, top in ROWS:
                opts = QuantizeOptions(plan=PLANS[plan_name], method=method, clip=clip,
                                       calib=CalibConfig(seqs=args.calib_seqs), lqer=LqerOptions(top=top, rank=4))
                path = Path(d) / "a.gq"
                start = time.perf_counter()
                result = quantize_with_plan(ckpt, opts, calibration=calibration)
                quant_s = time.perf_counter() - start
                size = write_artifact(path, result.tensors, result.plan, result.meta).total_bytes
                qmodel = build_model(ckpt.state_dict, ckpt.config).eval()
                load_quantized_weights(qmodel, path)
                bpb = eval_val_bpb(qmodel, tokens, luts, seq_len).val_bpb
                ratios = [r.error_vs_rtn for r in result.reports if r.error_vs_rtn is not None]
                row = {"plan": plan_name, "method": label, "val_bpb": bpb, "gap_bpb": bpb - float_bpb,
                       "artifact_bytes": size, "quantize_s": round(quant_s, 1),
                       "mean_gptq_error_vs_rtn": round(sum(ratios) / len(ratios), 4) if ratios else None}
                rows.append(row)
                print(f"{plan_name:34s} {label:28s} gap {row['gap_bpb']:+.4f}  bytes {row['artifact_bytes']:>9,}"
                      f"  quantize {row['quantize_s']} s  H-err/RTN {row['mean_gptq_error_vs_rtn']}", flush=True)
    report = {"checkpoint": str(args.ckpt.relative_to(ROOT)) if args.ckpt.is_relative_to(ROOT) else str(args.ckpt),
              "float_val_bpb": float_bpb, "eval_tokens": tokens.numel() - 1, "seq_len": seq_len,
              "calib": {"source": "selfgen", "seqs": args.calib_seqs, "seq_len": seq_len, "seed": 0,
                        "seconds": round(calib_s, 1)},
              "size_clip_bpw": SIZE_BPW, "rows": rows}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    plans = list(dict.fromkeys(r["plan"] for r in report["rows"]))
    lines = ["| method | " + " | ".join(f"{p}: gap bpb / bytes" for p in plans) + " |",
             "|---|" + "---|" * len(plans)]
    for label in dict.fromkeys(r["method"] for r in report["rows"]):
        cells = []
        for p in plans:
            r = next((r for r in report["rows"] if r["plan"] == p and r["method"] == label), None)
            cells.append("" if r is None else f"{r['gap_bpb']:+.4f} / {r['artifact_bytes']:,}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
