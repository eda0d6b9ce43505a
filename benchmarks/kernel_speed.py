"""Throughput of the dequant kernels and of the fused dequant-matmul; writes benchmarks/kernels_<device>.json.

On CUDA: GB/s of each layout's kernel (packed bytes + scales + output) on the baseline shapes and on
8192x8192, as a fraction of a device-to-device copy of the output's size measured in the same run
(torch.cuda.Event timing, warmup, median of --reps); a tile sweep for int4 at 8192x8192 (goal: >= 60% of
copy bandwidth); fused matmul vs dequantize-then-F.linear at M = 1, 16, 64. Every result is also checked
against the torch reference (bit-exact for dequant, within the rounding bound of kernels/matmul.py).
On CPU: the Triton interpreter on small shapes, which checks exactness only; its timings mean nothing.

    .venv/bin/python benchmarks/kernel_speed.py [--reps 50] [--out PATH]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before kernels is imported: the kernels are built at import

import triton  # noqa: E402

from golfquant.atomic import atomic_write_text  # noqa: E402
from golfquant.pack import pack_codes  # noqa: E402
from kernels import (  # noqa: E402
    KernelConfig, dequant_matmul, dequantize_packed, dequantize_reference,
)

GPU_SHAPES = [(512, 512), (256, 512), (1024, 512), (512, 1024), (8192, 8192)]
CPU_SHAPES = [(64, 64), (96, 130)]
LAYOUTS = [(8, "int8"), (4, "nibble"), (2, "planes"), (3, "planes"), (4, "planes"), (5, "planes"), (6, "planes"),
           (7, "planes"), (8, "planes"), (8, "int8.T"), (4, "nibble.T"), (6, "planes.T")]
INT4_TILES = [KernelConfig(32, 128, 4), KernelConfig(16, 256, 4), KernelConfig(32, 256, 8),
              KernelConfig(64, 128, 8), KernelConfig(8, 512, 4), KernelConfig(64, 256, 8)]
MATMUL_LAYOUTS = [(4, "nibble"), (6, "planes")]
MATMUL_ROWS = [1, 16, 64]
GOAL_FRACTION = 0.60


def time_ms(fn, reps: int) -> float:
    """Median milliseconds of fn(): CUDA events after warmup on a GPU, wall clock in the interpreter."""
    for _ in range(3 if CUDA else 1):
        fn()
    times = []
    for _ in range(reps):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)  # packing 8192x8192 in numpy takes seconds; the tile sweep reuses it
def make_weight(shape, bits, layout, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = 2 ** (bits - 1) - 1
    codes = torch.randint(-r, r + 1, shape, generator=g, dtype=torch.int8)
    scales = (torch.rand(shape[:-1], generator=g) * 0.05 + 1e-3).half()
    packed = torch.frombuffer(bytearray(pack_codes(codes, bits, layout)), dtype=torch.uint8)
    return packed.to(device), scales.to(device)


def copy_gbps(nbytes: int, device, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_ms(lambda: dst.copy_(src), reps) / 1e6


def bench_dequant(shape, bits, layout, device, reps, copy, config=None, lqer=None) -> dict:
    packed, scales = make_weight(shape, bits, layout, device)
    run = lambda: dequantize_packed(packed, bits, layout, shape, scales, lqer, torch.bfloat16,  # noqa: E731
                                    backend="triton", config=config)
    out = run()
    exact = torch.equal(out, dequantize_reference(packed, bits, layout, shape, scales, lqer, torch.bfloat16))
    ms = time_ms(run, reps)
    gbps = (packed.numel() + 2 * scales.numel() + 2 * out.numel()) / ms / 1e6
    return {"bits": bits, "layout": layout, "shape": list(shape), "lqer_rank": 0 if lqer is None else lqer[0].shape[1],
            "config": None if config is None else vars(config), "ms": ms, "gbps": gbps,
            "copy_gbps": copy, "fraction_of_copy": gbps / copy, "exact": exact}


def bench_matmul(shape, bits, layout, m, device, reps) -> dict:
    packed, scales = make_weight(shape, bits, layout, device)
    x = torch.randn(m, shape[1], device=device).to(torch.bfloat16)
    fused = lambda: dequant_matmul(x, packed, bits, layout, shape, scales, backend="triton")  # noqa: E731
    unfused = lambda: torch.nn.functional.linear(  # noqa: E731
        x, dequantize_packed(packed, bits, layout, shape, scales, dtype=x.dtype, backend="triton"))
    w = dequantize_reference(packed, bits, layout, shape, scales, dtype=x.dtype).double()
    exact = x.double() @ w.T
    bound = (x.double().abs() @ w.abs().T) * shape[1] * 2 ** -20 + torch.finfo(x.dtype).eps * exact.abs()
    within = bool(((fused().double() - exact).abs() <= bound).all())
    fused_ms, unfused_ms = time_ms(fused, reps), time_ms(unfused, reps)
    return {"bits": bits, "layout": layout, "shape": list(shape), "m": m, "fused_ms": fused_ms,
            "dequant_then_matmul_ms": unfused_ms, "speedup": unfused_ms / fused_ms, "within_bound": within}


def device_name() -> str:
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_") if CUDA else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50 if CUDA else 2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / f"kernels_{device_name()}.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cuda" if CUDA else "cpu")
    shapes = GPU_SHAPES if CUDA else CPU_SHAPES
    if not CUDA:
        print("No CUDA device: running the Triton interpreter on small CPU shapes. It checks that the kernels "
              "match the reference; its timings mean nothing about GPU speed.")
    copies = {shape: copy_gbps(2 * shape[0] * shape[1], device, args.reps) for shape in shapes}
    report = {"device": device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "interpreter": not CUDA, "copy_gbps": {f"{r}x{c}": v for (r, c), v in copies.items()},
              "dequant": [], "int4_tiles": [], "matmul": []}
    for shape in shapes:
        for bits, layout in LAYOUTS:
            row = bench_dequant(shape, bits, layout, device, args.reps, copies[shape])
            report["dequant"].append(row)
            print(f"dequant {layout:9s} b{bits} {shape[0]:5d}x{shape[1]:<5d} {row['ms']:9.4f} ms "
                  f"{row['gbps']:8.3g} GB/s  {100 * row['fraction_of_copy']:5.1f}% of copy  exact={row['exact']}")
    g = torch.Generator().manual_seed(1)
    lqer_shape = shapes[0]
    lqer = tuple(t.to(device) for t in (torch.randn(lqer_shape[0], 8, generator=g) * 1e-2,
                                        torch.randn(8, lqer_shape[1], generator=g) * 1e-2))
    row = bench_dequant(lqer_shape, 6, "planes", device, args.reps, copies[lqer_shape], lqer=lqer)
    report["dequant"].append(row)
    print(f"dequant planes b6 + LQER rank 8 {lqer_shape}: {row['ms']:.4f} ms exact={row['exact']}")
    big = shapes[-1]
    for config in INT4_TILES:
        row = bench_dequant(big, 4, "nibble", device, args.reps, copies[big], config=config)
        report["int4_tiles"].append(row)
        print(f"int4 nibble {big} tile {config}: {row['gbps']:.3g} GB/s, {100 * row['fraction_of_copy']:.1f}% of copy")
    best = max(report["int4_tiles"], key=lambda r: r["fraction_of_copy"])
    report["int4_goal"] = {"fraction_of_copy": best["fraction_of_copy"], "config": best["config"],
                           "goal": GOAL_FRACTION, "met": CUDA and best["fraction_of_copy"] >= GOAL_FRACTION}
    for shape in shapes:
        for bits, layout in MATMUL_LAYOUTS:
            for m in MATMUL_ROWS:
                row = bench_matmul(shape, bits, layout, m, device, args.reps)
                report["matmul"].append(row)
                print(f"matmul {layout:7s} b{bits} N,K={shape} M={m:2d}: fused {row['fused_ms']:.4f} ms, "
                      f"dequant+matmul {row['dequant_then_matmul_ms']:.4f} ms ({row['speedup']:.2f}x) "
                      f"within_bound={row['within_bound']}")
    failures = [r for r in report["dequant"] + report["int4_tiles"] if not r["exact"]]
    failures += [r for r in report["matmul"] if not r["within_bound"]]
    report["all_checks_pass"] = not failures
    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}; checks {'pass' if not failures else f'FAIL ({len(failures)})'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
