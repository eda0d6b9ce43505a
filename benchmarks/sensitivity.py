"""Which damage signal predicts the measured damage: the choice of `--budget`'s signal (issue 11).

For every free matrix x candidate of golfquant.measure's grid (the codes GPTQ produces), on the two checkpoints of
benchmarks/checkpoints.py:
* truth: KL(float || the model with only that tensor quantized) on validation tokens (the first --val-seqs x
  (seq_len + 1) of the bundled val split), which neither calibration nor any signal sees; beside it the
  increase of the validation loss itself (`delta loss`, noisier: a small change can lower it by chance);
* signals, each with the seconds it costs:
  - `hessian proxy`: tr(E H Eᵀ) of RTN codes (h̄·‖E‖² without a Hessian), the allocation's signal before issue 11;
  - `gptq error`: tr(E H Eᵀ) of the GPTQ codes;
  - `fisher`: golfquant.sensitivity, what `--budget` uses (one backward pass over 4,096 held-out tokens);
  - `kl probe`: the KL itself on 1,024 held-out self-generated tokens (a forward pass per candidate).
It reports the Spearman rank correlation of each signal with the truth (over all pairs; across tensors at one
candidate, averaged; within one tensor, averaged) and with the delta loss, the spread of truth/signal, and what each signal
decides: the allocation (golfquant.quant.allocate) it makes at budgets from uniform int4's to uniform int8's table
bytes, scored by the truth summed over the chosen candidates, against the allocation made with the truth itself.

    .venv/bin/python benchmarks/sensitivity.py          # ~25 min on one thread; writes benchmarks/sensitivity.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoints import checkpoints, sha256
from golfquant.atomic import atomic_write_text
from golfquant.calib import CalibConfig
from golfquant.checkpoint import load_checkpoint
from golfquant.data import default_val_pattern, load_tokens
from golfquant.measure import candidate_grid, dequantized, entropy_bytes, stored_values
from golfquant.options import QuantizeOptions
from golfquant.pipeline import build_float_model, calibrate, hessian_of
from golfquant.plan import PlanOptions, make_plan
from golfquant.quant.allocate import allocate
from golfquant.quant.clip import hessian_weighted_error, round_codes, row_scales
from golfquant.sensitivity import measure_sensitivity, plan_divergence, reference_logprobs

OUT = Path(__file__).with_suffix(".json")
SIGNALS = ("hessian proxy", "gptq error", "fisher", "kl probe")


@dataclass
class Opt:
    bytes: float
    damage: float


def ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):  # ties share their mean rank
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(a, b) -> float:
    a, b = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def run(label: str, path: Path, args) -> dict:
    ckpt = load_checkpoint(path)
    sd = ckpt.state_dict
    opts = QuantizeOptions(calib=CalibConfig(seqs=args.calib_seqs, holdout=4096))
    model = build_float_model(ckpt, opts)
    calibration = calibrate(ckpt, opts, model=model, heldout=True)
    hessians = calibration.hessians
    start = time.perf_counter()
    sens = measure_sensitivity(model, calibration.heldout, hessians)
    fisher_setup = time.perf_counter() - start
    seq_len = model.config.seq_len
    val = load_tokens(default_val_pattern(), args.val_seqs * (seq_len + 1)).long().reshape(args.val_seqs, -1)
    val_ref = reference_logprobs(model, val)
    probe = calibration.heldout[: max(1, 1024 // seq_len)]
    probe_ref = reference_logprobs(model, probe)
    plan = make_plan(sd, PlanOptions(float_max_numel=0))
    names = [n for n, tp in plan.items() if tp.bits is not None]
    diag_means = sorted(float(torch.diagonal(h.H).mean()) for h in hessians.values())
    h_default = diag_means[len(diag_means) // 2]
    quantizer = opts.quantizer
    rows, seconds = [], {s: 0.0 for s in SIGNALS} | {"truth": 0.0, "quantize": 0.0}
    for name in names:
        w, h, role = sd[name].float(), hessian_of(hessians, name), plan[name].role
        grid = candidate_grid(role, w.dim())
        t0 = time.perf_counter()
        values = stored_values(w, grid, role, h, quantizer)
        seconds["quantize"] += time.perf_counter() - t0
        for cand, (value, _) in zip(grid, values):
            t1 = time.perf_counter()
            w_hat = dequantized(value)
            if cand.bits is None:
                proxy_err = hessian_weighted_error(w, w_hat, h)
            else:
                scales = row_scales(w, cand.bits, cand.clip, h, role)
                rtn = round_codes(w, scales, cand.bits).float() * scales.float()[:, None]
                proxy_err = hessian_weighted_error(w, rtn, h)
            proxy = proxy_err if h is not None else h_default * proxy_err
            t2 = time.perf_counter()
            gptq = hessian_weighted_error(w, w_hat, h)
            t3 = time.perf_counter()
            fisher = sens.damage(name, w, w_hat)
            t4 = time.perf_counter()
            kl_probe = plan_divergence(model, {name: w_hat}, probe, probe_ref).kl
            t5 = time.perf_counter()
            truth, delta_loss = plan_divergence(model, {name: w_hat}, val, val_ref)
            t6 = time.perf_counter()
            for key, dt in (("hessian proxy", t2 - t1), ("gptq error", t3 - t2),
                            ("fisher", t4 - t3), ("kl probe", t5 - t4), ("truth", t6 - t5)):
                seconds[key] += dt
            rows.append({"name": name, "candidate": cand.key, "bits": cand.bits, "bytes": entropy_bytes(value),
                         "truth": truth, "delta loss": delta_loss, "hessian proxy": proxy, "gptq error": gptq, "fisher": fisher,
                         "kl probe": kl_probe})
        print(f"{label}: {name} done", flush=True)
    seconds["fisher"] += fisher_setup
    return {"checkpoint": str(path.relative_to(path.parents[1])), "sha256": sha256(path), "rows": rows,
            "seconds": {k: round(v, 1) for k, v in seconds.items()}, "fisher_setup_seconds": round(fisher_setup, 2),
            "heldout_tokens": int(calibration.heldout.numel()), "val_tokens": int(val[:, 1:].numel()),
            "calib_tokens": calibration.info["tokens"], "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    quant = [r for r in rows if r["bits"] is not None]
    truth = [r["truth"] for r in quant]
    out: dict = {"pairs": len(quant)}
    for s in SIGNALS:
        across = [spearman([r[s] for r in quant if r["candidate"] == c], [r["truth"] for r in quant if r["candidate"] == c])
                  for c in sorted({r["candidate"] for r in quant})]
        within = [spearman([r[s] for r in quant if r["name"] == n], [r["truth"] for r in quant if r["name"] == n])
                  for n in sorted({r["name"] for r in quant})]
        logratio = [math.log(r["truth"] / r[s]) for r in quant if r["truth"] > 0 and r[s] > 0]
        out[s] = {"spearman": spearman([r[s] for r in quant], truth), "across_tensors": float(np.nanmean(across)),
                  "spearman_delta_loss": spearman([r[s] for r in quant], [r["delta loss"] for r in quant]),
                  "within_tensor": float(np.nanmean(within)), "log_ratio_std": float(np.std(logratio))}
    out["decisions"] = decisions(rows)
    return out


def decisions(rows: list[dict]) -> list[dict]:
    names = list(dict.fromkeys(r["name"] for r in rows))
    by = {n: [r for r in rows if r["name"] == n] for n in names}

    def width_bytes(bits: int) -> float:  # the table bytes of every tensor at this width, the records' k scaled
        return sum(min((r for r in by[n] if r["bits"] == bits), key=lambda r: abs(r["bytes"] - np.median(
            [x["bytes"] for x in by[n] if x["bits"] == bits])))["bytes"] for n in names)

    lo, hi = width_bytes(4), width_bytes(8)
    out = []
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        budget = lo + frac * (hi - lo)
        point = {"budget_bytes": round(budget)}
        for s in ("truth",) + SIGNALS:
            table = {n: [Opt(r["bytes"], max(r[s], 0.0)) for r in by[n]] for n in names}
            choice = allocate(table, budget)
            point[s] = None if choice is None else sum(by[n][i]["truth"] for n, i in choice.items())
        out.append(point)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--val-seqs", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {label: run(label, path, args) for label, path in checkpoints().items()}
    atomic_write_text(OUT, json.dumps({"signals": SIGNALS, "checkpoints": results}, indent=1) + "\n")
    for label, r in results.items():
        print(f"\n{label} ({r['summary']['pairs']} tensor x candidate pairs; seconds per signal {r['seconds']})")
        print("| signal | Spearman | across tensors | within a tensor | std log(truth/signal) | Spearman, delta loss |")
        print("|---|---|---|---|---|---|")
        for s in SIGNALS:
            x = r["summary"][s]
            print(f"| {s} | {x['spearman']:.3f} | {x['across_tensors']:.3f} | {x['within_tensor']:.3f} | "
                  f"{x['log_ratio_std']:.2f} | {x['spearman_delta_loss']:.3f} |")
        print("| budget bytes | " + " | ".join(("truth",) + SIGNALS) + " |")
        for d in r["summary"]["decisions"]:
            print(f"| {d['budget_bytes']:,} | " + " | ".join(
                "-" if d[s] is None else f"{d[s]:.5f}" for s in ("truth",) + SIGNALS) + " |")


if __name__ == "__main__":
    main()
