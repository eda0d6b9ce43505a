"""The rANS codes coder against brotli-11, lzma-9 and the entropy bounds, on realistic integer codes.

Run: .venv/bin/python benchmarks/entropy_coder.py [--quick]   (prints a table; writes benchmarks/entropy_coder.json)

Cases: synthetic 1024x512 weights (Student-t nu=4 and Gaussian) quantized per row with amax or SDClip scales
(s = k std(row) / qmax; int6 k=12.85, int4 k=6), with and without a log-normal spread across input columns
(sigma 0.5, as trained input channels have); a synthetic int8 tied embedding with near-identical rows; plus,
when golfquant/assets/model.pt exists, its matrices (numel > 65,536) at per-row SDClip int6 / int5 / int4
(k = 12.85 / 9 / 6) and tok_emb at int8 (k = 20).
Columns: our bytes; brotli-11 (lgwin 24) on the int8 codes row-major and transposed; lzma-9; the order-0,
per-row and per-column empirical entropy bounds (tables not counted); `own` = our bytes over (ideal code length
under our chosen model + model bytes), i.e. the coder's own loss; encode / decode speed in M codes per second
(the JSON adds the speed of fitting the size model, which estimate_encoded_bytes runs).
"""
from __future__ import annotations

import argparse
import json
import lzma
import time
from pathlib import Path

import brotli
import numpy as np
import torch

from golfquant.atomic import atomic_write_text
from golfquant.codec import entropy
from golfquant.codec.rans import decode_codes, encode_codes, fit_size_model, size_breakdown

SDCLIP_K = {4: 6.0, 5: 9.0, 6: 12.85, 8: 20.0}
CHECKPOINT = Path(__file__).resolve().parents[1] / "golfquant" / "assets" / "model.pt"


def quantize(w: np.ndarray, bits: int, scale: str) -> np.ndarray:
    r = 2 ** (bits - 1) - 1
    if scale == "amax":
        s = np.abs(w).max(axis=1, keepdims=True) / r
    else:
        s = SDCLIP_K[bits] * w.std(axis=1, keepdims=True) / r
    s = np.maximum(s.astype(np.float16).astype(np.float64), 1e-10)
    return np.clip(np.rint(w / s), -r, r).astype(np.int8)


def synthetic_cases(rows: int, cols: int):
    rng = np.random.default_rng(0)
    for dist in ("t4", "gauss"):
        base = rng.standard_t(4, (rows, cols)) if dist == "t4" else rng.standard_normal((rows, cols))
        spread = np.exp(rng.normal(0.0, 0.5, cols))[None, :]
        for colspread in (False, True):
            w = base * spread if colspread else base
            for bits, scale in ((6, "amax"), (6, "sdclip"), (4, "amax"), (4, "sdclip")):
                name = f"{dist} {rows}x{cols}{' colspread' if colspread else ''}"
                yield name, bits, scale, quantize(w, bits, scale)


def embedding_case(vocab: int, dim: int):
    """A tied-embedding stand-in: 1500 trained rows (shared + own direction), the rest rarely seen tokens that
    are the shared vector plus 0.3% noise (near-identical rows, which LZ codecs match); int8, SDClip k=20."""
    rng = np.random.default_rng(1)
    shared = rng.standard_normal(dim) * 0.05
    own = np.where(np.arange(vocab) < 1500, 1.0, 0.003)[:, None] * 0.05 * rng.standard_normal((vocab, dim))
    w = (shared + own)[rng.permutation(vocab)]
    return f"synthetic tok_emb {vocab}x{dim}", 8, "sdclip", quantize(w, 8, "sdclip")


def checkpoint_cases():
    if not CHECKPOINT.exists():
        return
    sd = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["model"]
    for name, t in sd.items():
        if t.ndim != 2 or t.numel() <= 65536:
            continue
        w = t.float().numpy().astype(np.float64)
        widths = (8,) if "tok_emb" in name else (6, 5, 4)
        for bits in widths:
            yield name, bits, "sdclip", quantize(w, bits, "sdclip")


def measure(name: str, bits: int, scale: str, q: np.ndarray) -> dict:
    t = time.perf_counter()
    blob = encode_codes(q, bits)
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    out = decode_codes(blob, q.shape, bits)
    t_dec = time.perf_counter() - t
    assert np.array_equal(out, q), name
    t = time.perf_counter()
    model = fit_size_model(q, bits)
    t_est = time.perf_counter() - t
    parts = size_breakdown(q, bits)
    raw = q.tobytes()
    bro = len(brotli.compress(raw, quality=11, lgwin=24))
    bro_t = len(brotli.compress(np.ascontiguousarray(q.T).tobytes(), quality=11, lgwin=24))
    return {
        "tensor": name, "shape": list(q.shape), "bits": bits, "scale": scale, "kind": parts.kind,
        "rans": len(blob), "estimate": round(model.estimated_bytes, 1), "model_bytes": parts.model_bytes,
        "brotli11": bro, "brotli11_T": bro_t, "lzma9": len(lzma.compress(raw, preset=9)),
        "H_order0": round(entropy.order0_bits(q) / 8, 1), "H_rows": round(entropy.row_conditional_bits(q) / 8, 1),
        "H_cols": round(entropy.column_conditional_bits(q) / 8, 1),
        "vs_best_brotli": round(len(blob) / min(bro, bro_t), 4),
        "own": round(len(blob) / (parts.payload_bytes + parts.model_bytes), 4),
        "encode_Mcodes_s": round(q.size / t_enc / 1e6, 2), "decode_Mcodes_s": round(q.size / t_dec / 1e6, 2),
        "estimate_Mcodes_s": round(q.size / t_est / 1e6, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="256x128 synthetic matrices, no checkpoint, no JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, cols = (256, 128) if args.quick else (1024, 512)
    cases = list(synthetic_cases(rows, cols)) + [embedding_case(rows * 4, cols)]
    cases += [] if args.quick else list(checkpoint_cases())
    head = (f"{'tensor':34s} {'b':>1s} {'scale':6s} {'kind':10s} {'rans':>8s} {'brotli':>8s} {'brotliT':>8s} "
            f"{'lzma9':>8s} {'H0':>8s} {'Hrow':>8s} {'Hcol':>8s} {'/brotli':>7s} {'own':>6s} {'enc':>5s} {'dec':>5s}")
    print(head)
    results = []
    for name, bits, scale, q in cases:
        r = measure(name, bits, scale, q)
        results.append(r)
        print(f"{name[:34]:34s} {bits:1d} {scale:6s} {r['kind']:10s} {r['rans']:8d} {r['brotli11']:8d} "
              f"{r['brotli11_T']:8d} {r['lzma9']:8d} {r['H_order0']:8.0f} {r['H_rows']:8.0f} {r['H_cols']:8.0f} "
              f"{r['vs_best_brotli']:7.4f} {r['own']:6.4f} {r['encode_Mcodes_s']:5.2f} {r['decode_Mcodes_s']:5.2f}",
              flush=True)
    worst = max(r["vs_best_brotli"] for r in results)
    print(f"worst ratio to the better brotli-11 orientation: {worst:.4f}; "
          f"worst own loss: {max(r['own'] for r in results):.4f}; checkpoint: {CHECKPOINT.exists()}")
    if not args.quick:
        out = {"checkpoint": str(CHECKPOINT) if CHECKPOINT.exists() else None, "results": results}
        atomic_write_text(Path(__file__).with_suffix(".json"), json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
