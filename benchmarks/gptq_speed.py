"""GPTQ and clip-selection speed on one CPU thread, at the baseline model's matrix shapes.

Run: .venv/bin/python benchmarks/gptq_speed.py   (prints seconds; writes benchmarks/gptq_speed.json)

At the records' shapes (11x512, MLP 3x): seconds per setting of one sweep alone against eight settings sharing
sweeps (gptq_quantize_many, as the budget's measurement runs them), by in-block step (gptq._SUB_BLOCK); and the
LQER factors' subspace iteration (lqer.top_left_singular) against a full SVD: seconds, and the share of the SVD's
top-4 singular energy it captures, on GPTQ errors weighted as lqer_factors weights them.

Also probes the factorisations' precision: on nearly singular Hessians (fewer calibration tokens than
columns) at damp 0.01, 0.001 and 0, the fp32 chain cholesky -> cholesky_inverse -> upper cholesky against the
fp64 one the quantizer uses (failures, relative deviation of the factor, time).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from golfquant.atomic import atomic_write_text
from golfquant.quant.clip import parse_clip, row_scales
from golfquant.quant import gptq
from golfquant.quant.gptq import Rounding, gptq_quantize, gptq_quantize_many, inverse_cholesky
from golfquant.quant.lqer import top_left_singular

# Baseline 9 x 512, MLP 2x, 4 KV heads: per layer c_q, c_k, c_v, proj, fc, mlp.proj.
BASELINE_LAYER = [(512, 512), (256, 512), (256, 512), (512, 512), (1024, 512), (512, 1024)]
BASELINE_LAYERS = 9
RECORD_LAYER = [(512, 512), (256, 512), (256, 512), (512, 512), (1536, 512), (512, 1536)]
SHARED = 8  # settings per shared sweep
REPEATS = 3


def correlated_hessian(cols: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * (cols**-0.5)
    x += 0.1 * torch.randn(tokens, cols, generator=g)
    return x.T @ x / tokens


def best_of(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gptq_seconds(rows: int, cols: int) -> float:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols)) * 0.02
    h = correlated_hessian(cols, 4096, seed=cols)
    s = row_scales(w, 6, parse_clip("sdclip:12.85"))
    return best_of(lambda: gptq_quantize(w, h, 6, s))


def shared_sweeps(rows: int, cols: int) -> dict[str, float]:
    """Seconds per setting: one sweep each, and SHARED settings (widths 3..8 and two more clips) in shared sweeps,
    by in-block step."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + cols)) * 0.02
    h = correlated_hessian(cols, 4096, seed=cols)
    prepared = gptq.prepare_hessian(h)
    settings = [Rounding(b, row_scales(w, b, parse_clip(f"sdclip:{k}"))) for b, k in
                [(3, 4.24), (4, 8), (5, 8), (6, 12.85), (7, 8), (8, 16), (5, 11.31), (6, 8)]][:SHARED]
    out = {}
    original = gptq._SUB_BLOCK
    try:
        for step in (8, 16, 32, 128):
            gptq._SUB_BLOCK = step
            out[f"alone_step{step}"] = best_of(lambda: gptq_quantize(w, h, 6, settings[3].scales, prepared=prepared,
                                                                    errors=False), repeats=2)
            out[f"shared_step{step}"] = best_of(lambda: gptq_quantize_many(w, h, settings, prepared=prepared,
                                                                          errors=False), repeats=2) / SHARED
    finally:
        gptq._SUB_BLOCK = original
    return out


def lqer_subspace(rows: int, cols: int) -> dict[str, float]:
    """top_left_singular against torch.linalg.svd on a GPTQ error (int4) weighted by sqrt(diag H)."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3)) * 0.02
    h = correlated_hessian(cols, 4096, seed=4)
    qt, _ = gptq_quantize(w, h, 4, row_scales(w, 4, parse_clip("sdclip:8")), errors=False)
    x = ((w - qt.dequantize()) * torch.diagonal(h).sqrt()).double()
    svd = torch.linalg.svd(x, full_matrices=False)[0][:, :4]
    fast = top_left_singular(x, 4)
    return {"svd_seconds": best_of(lambda: torch.linalg.svd(x, full_matrices=False), repeats=2),
            "subspace_seconds": best_of(lambda: top_left_singular(x, 4), repeats=2),
            "captured_energy": float((fast.T @ x).norm() ** 2 / (svd.T @ x).norm() ** 2)}


def clip_seconds(rows: int, cols: int) -> dict[str, float]:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)) * 0.02
    h = correlated_hessian(cols, 4096, seed=2)
    specs = ["sdclip:12.85", "hsdclip:12.85,0.175", "pct:99.99984", "mse", "size:3.5"]
    return {t: best_of(lambda t=t: row_scales(w, 6, parse_clip(t), hessian=h), repeats=1) for t in specs}


def fp32_factor(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """The quantizer's factor chain in fp32 instead of fp64 (None where it fails)."""
    h = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0])
    chol, info = torch.linalg.cholesky_ex(h)
    if info != 0:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    return upper if info == 0 and bool(torch.isfinite(upper).all()) else None


def precision_probe(cols: int = 512, trials: int = 3) -> dict[str, object]:
    """fp32 vs fp64 factor chain: failures, and the fp32 factor's relative deviation from fp64."""
    out = {}
    for tokens in (64, 256, 4096):
        hs = [correlated_hessian(cols, tokens, seed=100 + i) for i in range(trials)]
        for damp in (0.01, 0.001, 0.0):
            f32 = [fp32_factor(h, damp) for h in hs]
            f64 = [inverse_cholesky(h, damp) for h in hs]
            devs = [float((a.double() - b[0]).norm() / b[0].norm()) for a, b in zip(f32, f64)
                    if a is not None and b[2] == 0]
            out[f"tokens={tokens},damp={damp}"] = {
                "trials": trials, "fp32_ok": sum(a is not None for a in f32),
                "fp64_escalations": [b[2] for b in f64], "fp32_max_rel_dev": max(devs, default=None)}
    h = correlated_hessian(1024, 4096, seed=7)
    out["factor_seconds_1024_fp64"] = best_of(lambda: inverse_cholesky(h, 0.01))
    out["factor_seconds_1024_fp32"] = best_of(lambda: fp32_factor(h, 0.01))
    return out


def main() -> None:
    torch.set_num_threads(1)
    shapes = sorted(set(BASELINE_LAYER) | {(1024, 512), (512, 1024)})
    sweeps = {f"{r}x{c}": gptq_seconds(r, c) for r, c in shapes}
    baseline_total = BASELINE_LAYERS * sum(sweeps[f"{r}x{c}"] for r, c in BASELINE_LAYER)
    result = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gptq_seconds": sweeps,
        "gptq_baseline_54_matrices_seconds": baseline_total,
        "clip_seconds_1024x512": clip_seconds(1024, 512),
        "precision_probe_512_cols": precision_probe(),
        "record_shapes_seconds_per_setting": {f"{r}x{c}": shared_sweeps(r, c) for r, c in sorted(set(RECORD_LAYER))},
        "lqer_top4": {f"{r}x{c}": lqer_subspace(r, c) for r, c in sorted(set(RECORD_LAYER))},
    }
    for key, value in result.items():
        print(f"{key}: {value}")
    atomic_write_text(Path(__file__).with_suffix(".json"), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
