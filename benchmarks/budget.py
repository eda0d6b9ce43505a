"""Budget allocation against uniform int6 SDClip k=12.85 (the records' setting) at equal byte budgets.

Run: .venv/bin/python benchmarks/budget.py [--method rtn|gptq] [--eval-tokens N]   (writes benchmarks/budget.json and
benchmarks/budget.png)

On the bundled checkpoint: uniform RTN artifacts (every matrix at int5 / int6 / int7 with SDClip k = 12.85·2^(b-6),
the records' k scaled with the width), then `quantize --budget B` at B = each uniform artifact's size and at a
few more budgets; every artifact is evaluated with the roundtrip val_bpb on the bundled validation shard.
Also defines `baseline_like_state_dict`, the baseline-size synthetic model benchmarks/codecs.py uses.
"""
from __future__ import annotations

from pathlib import Path


import argparse
import json
import math
import tempfile
import time

import numpy as np
import torch

from golfquant.atomic import atomic_write_text
from golfquant.calib import CalibConfig
from golfquant.data import default_tokenizer_path, default_val_pattern
from golfquant.api import quantize_checkpoint
from golfquant.pipeline import QuantizeOptions, RoundtripOptions, roundtrip_eval
from golfquant.plan import PlanOptions

CHECKPOINT = Path(__file__).resolve().parents[1] / "golfquant" / "assets" / "model.pt"
OUT = Path(__file__).with_suffix(".json")


def baseline_like_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """9 x 512, vocab 1024 (the challenge baseline's shapes, 17.06 M parameters) with trained-like statistics:
    Student-t (nu = 4) entries times a log-normal spread per output row (sigma 0.3) and per input column (sigma
    0.5), scaled to std 1/sqrt(fan_in); a tied embedding whose rarely seen rows (2/3 of them) are near-identical."""
    from golfquant.model import GPT, GPTConfig

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sd = {}
    for name, t in GPT(GPTConfig(vocab_size=1024, num_layers=9, model_dim=512, num_heads=8, num_kv_heads=4,
                                 mlp_mult=2, seq_len=1024)).state_dict().items():
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


def evaluate(artifact: Path, eval_tokens: int) -> dict:
    r = roundtrip_eval(artifact, CHECKPOINT, RoundtripOptions(default_val_pattern(), str(default_tokenizer_path()),
                                                              max_tokens=eval_tokens))
    return {"val_bpb": r["quantized"]["val_bpb"], "float_val_bpb": r["float"]["val_bpb"], "gap_bpb": r["gap_bpb"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--calib-seqs", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    calib = CalibConfig(seqs=args.calib_seqs)
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        def run(label: str, opts: QuantizeOptions, kind: str) -> dict:
            out = Path(tmp) / f"{label}.gqa"
            start = time.perf_counter()
            s = quantize_checkpoint(CHECKPOINT, out, opts)
            seconds = time.perf_counter() - start
            p = {"label": label, "kind": kind, "bytes": s["total_bytes"], "budget": s.get("budget"),
                 "pruned_codes": s.get("pruned_codes"), "quantize_seconds": round(seconds, 1),
                 "widths": sorted({t["bits"] for t in s["tensors"] if t["bits"]})} | evaluate(out, args.eval_tokens)
            print(json.dumps(p), flush=True)
            points.append(p)
            return p

        uniform = []
        for b in (5, 6, 7):
            k = 12.85 * 2.0 ** (b - 6)
            plan = PlanOptions(mlp=f"int{b}", attn=f"int{b}", embed=f"int{b}", other=f"int{b}")
            uniform.append(run(f"uniform int{b} k={k:g}", QuantizeOptions(
                plan=plan, method=args.method, clip=f"sdclip:{k}", calib=calib), "uniform"))
        budgets = sorted({u["bytes"] for u in uniform} | {int(uniform[0]["bytes"] * 0.8)})
        for budget in budgets:
            run(f"budget {budget}", QuantizeOptions(method=args.method, calib=calib, budget=budget), "allocated")
    six = next(p for p in points if p["label"].startswith("uniform int6"))
    same = next(p for p in points if p["kind"] == "allocated" and p["budget"] == six["bytes"])
    summary = {"checkpoint": CHECKPOINT.name, "method": args.method, "eval_tokens": args.eval_tokens,
               "points": points, "at_uniform_int6_bytes": {"bytes": six["bytes"], "uniform_val_bpb": six["val_bpb"],
                                                         "allocated_val_bpb": same["val_bpb"],
                                                         "allocated_bytes": same["bytes"]}}
    atomic_write_text(OUT, json.dumps(summary, indent=1) + "\n")
    plot(points)


def plot(points: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("uniform", "o"), ("allocated", "s")):
        pts = sorted((p["bytes"], p["val_bpb"]) for p in points if p["kind"] == kind)
        ax.plot([x / 1e6 for x, _ in pts], [y for _, y in pts], marker=marker, label=kind)
    ax.axhline(points[0]["float_val_bpb"], color="grey", linestyle=":", label="float")
    ax.set_xlabel("artifact bytes (MB)")
    ax.set_ylabel("roundtrip val_bpb")
    ax.set_title("bundled checkpoint: allocation vs uniform SDClip")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=100)


if __name__ == "__main__":
    main()
