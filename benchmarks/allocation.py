"""`--budget` against the plans a user writes by hand, at the same bytes, on validation tokens (issue 11's goal).

On each checkpoint of benchmarks/checkpoints.py, with one self-generated calibration (64 sequences) shared by every
artifact:
* budgets: five, evenly spaced from the bytes of uniform GPTQ int4 to those of uniform GPTQ int8 (every matrix,
  the default amax clip), and the bytes of the records' recipe;
* `--budget B` (golfquant.budget; one measurement, cached, for all budgets);
* uniform GPTQ int5, int6, int7, int8 at B: every matrix at that width, with the records' per-role SDClip k at
  that width (golfquant.quant.clip.record_k: MLP 12, attention 13 at int6, embedding 15 at int7 and 20 at int8)
  times one common factor s, the s that fills B (secant steps, the last ±1 codes pruned); s is kept large enough that the
  MLP clip is >= 4 sigma, the tightest clip any measured allocation chose, and the bytes that leaves are unused;
* the records' recipe: GPTQ int6 SDClip k=12.85 on the matrices, int8 k=20 on the tied embedding, at its own bytes.
Every artifact's val_bpb is measured on the first --eval-tokens of the bundled validation split (never used by
calibration or by the measurement), against the float model's on the same tokens.

    .venv/bin/python benchmarks/allocation.py      # ~45 min on one thread; writes allocation.json, allocation.png
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from checkpoints import checkpoints, sha256

from golfquant.api import quantize_checkpoint
from golfquant.atomic import atomic_write_text
from golfquant.calib import CalibConfig
from golfquant.checkpoint import load_checkpoint
from golfquant.data import default_tokenizer_path, default_val_pattern
from golfquant.evaluate import eval_val_bpb
from golfquant.options import QuantizeOptions
from golfquant.pipeline import build_float_model, calibrate
from golfquant.plan import PlanOptions
from golfquant.quant.clip import RECORD_K, record_k
from golfquant.roundtrip import load_quantized_weights, prepare_eval
from golfquant_cli.render import quantize_json

OUT = Path(__file__).with_suffix(".json")
WIDTHS = (5, 6, 7, 8)
RECORDS_CLIP = "sdclip:12.85,embed=20"
_SECANT = 4
MIN_CLIP = 4.0  # sigmas: the tightest clip of golfquant.measure's grid at int4..int8


def uniform(bits: int) -> PlanOptions:
    s = f"int{bits}"
    return PlanOptions(mlp=s, attn=s, embed=s, other=s, float_max_numel=0)


class Bench:
    def __init__(self, path: Path, work: Path, args):
        self.path, self.work, self.args = path, work, args
        self.ckpt = load_checkpoint(path)
        self.calib = CalibConfig(seqs=args.calib_seqs)
        opts = QuantizeOptions(calib=self.calib)
        start = time.perf_counter()
        self.calibration = calibrate(self.ckpt, opts, model=build_float_model(self.ckpt, opts), heldout=True)
        self.calib_seconds = time.perf_counter() - start
        self.ev = prepare_eval(self.ckpt, default_val_pattern(), str(default_tokenizer_path()), args.eval_tokens)
        self.float_bpb = self.bpb(None)
        self.count = 0

    def bpb(self, artifact: Path | None) -> float:
        if artifact is None:
            model = self.ev.model
        else:
            model = build_float_model(self.ckpt, QuantizeOptions())
            load_quantized_weights(model, artifact)
        return eval_val_bpb(model, self.ev.tokens, self.ev.luts, self.ev.seq_len).val_bpb

    def quantize(self, opts: QuantizeOptions, cache: Path | None = None) -> tuple[dict, Path]:
        """The `quantize --json` summary of the artifact written to a new file, and the file."""
        self.count += 1
        out = self.work / f"a{self.count}.gqa"
        start = time.perf_counter()
        result = quantize_checkpoint(self.path, opts, calibration=self.calibration, cache=cache)
        result.save(out)
        s = quantize_json(result, out)
        s["seconds"] = time.perf_counter() - start
        return s, out

    def point(self, label: str, summary: dict, artifact: Path, **extra) -> dict:
        bpb = self.bpb(artifact)
        p = {"plan": label, "total_bytes": summary["total_bytes"], "val_bpb": bpb, "gap_bpb": bpb - self.float_bpb,
             "quantize_seconds": round(summary["seconds"], 1)} | extra
        print(json.dumps(p), flush=True)
        return p

    def budget(self, budget: int) -> dict:
        s, out = self.quantize(QuantizeOptions(calib=self.calib, budget=budget), cache=self.work / "measure")
        schemes = Counter(a["scheme"] + " +lqer" * ("lqer" in a["setting"]) for a in s["allocation"])
        return self.point("--budget", s, out, chosen_plan=s["chosen_plan"], schemes=dict(sorted(schemes.items())),
                          measurement_cached=s["measurement"]["cached"], plans=s["plans"])

    def uniform_at(self, bits: int, budget: int, method: str = "gptq") -> dict:
        """Uniform intB by `method` at `budget`: the common clip factor s that fills it (secant steps on log bytes
        against log s, at most _SECANT more artifacts, the last pruned to fit), or the smallest allowed s when even
        that fits."""
        def clip(s: float) -> str:
            return "sdclip:" + ",".join(f"{role}={round(record_k(role, bits) * s, 4)!r}" for role in RECORD_K)

        def size(s: float) -> int:
            return self.quantize(QuantizeOptions(plan=uniform(bits), clip=clip(s), calib=self.calib,
                                                 method=method))[0]["total_bytes"]

        least = MIN_CLIP / record_k("mlp", bits)
        sizes = {least: size(least)}
        s = least
        if sizes[least] > budget:  # a coarser step is needed: bytes fall as s grows
            sizes[2 * least] = size(2 * least)
            for _ in range(_SECANT):
                (s0, b0), (s1, b1) = sorted(sizes.items(), key=lambda sb: abs(math.log(sb[1] / budget)))[:2]
                slope = math.log(b1 / b0) / math.log(s1 / s0) if b1 != b0 else -1.0
                s = max(least, s0 * math.exp(math.log(0.997 * budget / b0) / slope))
                sizes[s] = size(s)
                if 0.99 * budget <= sizes[s] <= budget:
                    break
        summary, out = self.quantize(QuantizeOptions(plan=uniform(bits), clip=clip(s), calib=self.calib,
                                                     method=method, budget=budget, prune_to_budget=True))
        return self.point(f"uniform int{bits}", summary, out, clip=clip(s), pruned_codes=summary["pruned_codes"])


def run(label: str, path: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(path, Path(tmp), args)
        ends = {bits: b.quantize(QuantizeOptions(plan=uniform(bits), calib=b.calib))[0]["total_bytes"] for bits in (4, 8)}
        rec_s, rec_out = b.quantize(QuantizeOptions(plan=PlanOptions(mlp="int6", attn="int6", embed="int8", other="int6"),
                                                    clip=RECORDS_CLIP, calib=b.calib))
        records = b.point("records' recipe", rec_s, rec_out)
        budgets = [round(ends[4] + i / 4 * (ends[8] - ends[4])) for i in range(5)] + [records["total_bytes"]]
        rows = []
        for budget in sorted(budgets):
            row = {"budget": budget, "budget_run": b.budget(budget)}
            row["uniform"] = [b.uniform_at(bits, budget) for bits in WIDTHS]
            if budget == records["total_bytes"]:
                row["records"] = records
            rows.append(row)
        timing = fresh_budget_seconds(path, Path(tmp), records["total_bytes"])
    return {"checkpoint": str(path.name), "sha256": sha256(path), "float_bpb": b.float_bpb,
            "eval_tokens": args.eval_tokens, "calib_seconds": round(b.calib_seconds, 1), "uniform_int4_bytes": ends[4],
            "uniform_int8_bytes": ends[8], "rows": rows, "fresh_budget_run": timing, "verdict": verdict(rows)}


def fresh_budget_seconds(path: Path, tmp: Path, budget: int) -> dict:
    """The whole `quantize --budget` from nothing (calibration and measurement included), then again cached."""
    out = {}
    for run_name in ("first", "cached"):
        start = time.perf_counter()
        result = quantize_checkpoint(path, QuantizeOptions(budget=budget), cache=tmp / "fresh")
        result.save(tmp / "fresh.gqa")
        out[run_name] = round(time.perf_counter() - start, 1)
        out[f"{run_name}_measurement_seconds"] = result.budget.measurement.seconds
    return out


def verdict(rows: list[dict]) -> dict:
    worse = [r["budget"] for r in rows if r["budget_run"]["val_bpb"] > min(u["val_bpb"] for u in r["uniform"])]
    at = next(r for r in rows if "records" in r)
    ratio = at["budget_run"]["gap_bpb"] / at["records"]["gap_bpb"]
    return {"budgets_where_a_uniform_plan_wins": worse, "gap_ratio_at_records_bytes": ratio,
            "goal_met": not worse and ratio <= 0.7}


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2))
    for ax, (label, r) in zip(axes, results.items()):
        series = {"--budget": [(x["budget_run"]["total_bytes"], x["budget_run"]["gap_bpb"]) for x in r["rows"]]}
        for i, bits in enumerate(WIDTHS):
            series[f"uniform int{bits}"] = [(x["uniform"][i]["total_bytes"], x["uniform"][i]["gap_bpb"]) for x in r["rows"]]
        for name, pts in series.items():
            pts.sort()
            ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker="s" if name == "--budget" else "o",
                    label=name, linewidth=2.5 if name == "--budget" else 1)
        rec = next(x["records"] for x in r["rows"] if "records" in x)
        ax.scatter([rec["total_bytes"] / 1e6], [rec["gap_bpb"]], marker="*", s=160, color="black", zorder=5,
                   label="records' recipe")
        ax.set_yscale("log")
        ax.set_xlabel("total bytes (MB)")
        ax.set_ylabel("val_bpb gap to float")
        ax.set_title(f"{label} (float {r['float_bpb']:.4f})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=100)


def bench_arguments() -> argparse.Namespace:
    """The options of a benchmark built on Bench (this one and moves.py), on one thread."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    torch.set_num_threads(1)
    return ap.parse_args()


def main() -> None:
    args = bench_arguments()
    results = {label: run(label, path, args) for label, path in checkpoints().items()}
    atomic_write_text(OUT, json.dumps(results, indent=1) + "\n")
    plot(results)
    for label, r in results.items():
        print(f"\n{label}: float val_bpb {r['float_bpb']:.4f} on {r['eval_tokens']:,} validation tokens; "
              f"verdict {r['verdict']}")
        print("| budget | --budget gap (plan) | " + " | ".join(f"uniform int{b}" for b in WIDTHS) + " | records' recipe |")
        print("|---|---|" + "---|" * len(WIDTHS) + "---|")
        for x in r["rows"]:
            u = " | ".join(f"{p['gap_bpb']:+.4f} ({p['total_bytes']:,})" for p in x["uniform"])
            rec = f"{x['records']['gap_bpb']:+.4f}" if "records" in x else ""
            print(f"| {x['budget']:,} | {x['budget_run']['gap_bpb']:+.4f} ({x['budget_run']['chosen_plan']}) | {u} | {rec} |")


if __name__ == "__main__":
    main()
