"""Fused dequantize-matmul for the eval path: y = x @ dequant(W).T with x [M, K] (M small), W [N, K] packed.

Each program dequantizes a [BN, BK] tile of W exactly as `dequantize_reference` does (q * scale in fp32,
rounded once to x's dtype) and feeds it to tl.dot with an fp32 accumulator, so W never exists in memory.
The torch reference is `F.linear(x, dequantize_reference(..., dtype=x.dtype))`. Both form exact products
(fp32 inputs: IEEE fp32, no TF32) and sum them in fp32 but in different orders (cuBLAS may also split K), so
each lies within eps(x's dtype) * |y| + 2**-20 * K * (|x| @ |W|.T) of the exact product; tests/test_kernels.py
checks both against an fp64 product with this bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.dequant import (
    check_packed, check_scales, codes_tile, dequantize_reference, is_aligned, kernel_widths,
    parse_layout, plane_bases, tl, to_out_dtype, triton, triton_jit, use_triton,
)

# Above this many activation rows a dequantized weight and cuBLAS beat re-dequantizing per row block.
FUSED_MAX_ROWS = 64
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class MatmulConfig:
    """Tile of one fused program: all (<= 64) activation rows x block_n outputs, K in steps of block_k."""

    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4


def dequant_matmul_reference(x: torch.Tensor, packed: torch.Tensor, bits: int, layout: str, shape,
                             scales: torch.Tensor) -> torch.Tensor:
    return F.linear(x, dequantize_reference(packed, bits, layout, shape, scales, dtype=x.dtype))


def dequant_matmul(x: torch.Tensor, packed: torch.Tensor, bits: int, layout: str, shape, scales: torch.Tensor,
                   backend: str = "auto", config: MatmulConfig | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(W [N, K]).T -> [M, N] in x's dtype; Triton for M <= FUSED_MAX_ROWS and x in
    FUSED_DTYPES on CUDA (or forced with backend='triton'), the torch reference otherwise."""
    shape = tuple(int(d) for d in shape)
    if x.dim() != 2 or len(shape) != 2 or x.shape[1] != shape[1]:
        raise ValueError(f"x must be [M, {shape[-1]}] for a weight of shape {shape}, got {tuple(x.shape)}")
    if x.shape[0] > FUSED_MAX_ROWS or x.dtype not in FUSED_DTYPES or not use_triton(backend, x.device):
        return dequant_matmul_reference(x, packed, bits, layout, shape, scales)
    spec = parse_layout(bits, layout)
    check_packed(packed, spec, shape)
    check_scales(scales, shape)
    return _matmul_triton(x.contiguous(), packed, spec, shape, scales.contiguous(), config or MatmulConfig())


def _matmul_triton(x, packed, spec, shape, scales, config: MatmulConfig) -> torch.Tensor:
    (m, k), n = x.shape, shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_m = max(16, triton.next_power_of_2(m))  # tl.dot needs >= 16 rows
    base1, base2 = plane_bases(n * k, spec)
    w0, w1, w2 = kernel_widths(spec)
    _dequant_matmul_kernel[(triton.cdiv(n, config.block_n),)](
        x, packed, scales, y, m, n, k, base1, base2,
        W0=w0, W1=w1, W2=w2, XOR=spec.xor, OFFSET=spec.offset, TRANSPOSED=spec.transposed,
        ALIGNED=is_aligned(n if spec.transposed else k, spec), OUT_BF16=x.dtype == torch.bfloat16,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        K_TILES=triton.cdiv(k, config.block_k), BM=block_m, BN=config.block_n, BK=config.block_k,
        num_warps=config.num_warps, enable_fp_fusion=False)  # keep W's q * scale a plain fp32 product
    return y


@triton_jit
def _dequant_matmul_kernel(x, packed, scales, y, M, N, K, base1, base2,
                           W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, XOR: tl.constexpr,
                           OFFSET: tl.constexpr, TRANSPOSED: tl.constexpr, ALIGNED: tl.constexpr,
                           OUT_BF16: tl.constexpr, PRECISION: tl.constexpr, K_TILES: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n0 = tl.program_id(0) * BN
    m = tl.arange(0, BM)
    n = n0 + tl.arange(0, BN)
    scale = tl.load(scales + n, mask=n < N, other=0).to(tl.float32)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kt in range(K_TILES):  # a constexpr bound: the interpreter of triton 3.6 rejects runtime loop bounds
        k0 = kt * BK
        kk = k0 + tl.arange(0, BK)
        xt = tl.load(x + m[:, None] * K + kk[None, :], mask=(m[:, None] < M) & (kk[None, :] < K), other=0)
        # Codes past K (read from masked bytes) are zeroed: their q * scale could overflow fp16 into inf * 0.
        if TRANSPOSED:  # the stream runs down W's columns: its [BK, BN] tile is already W.T's
            q = codes_tile(packed, base1, base2, 0, N, K, k0, n0, W0, W1, W2, XOR, OFFSET, BK, BN, ALIGNED)
            q = tl.where(kk[:, None] < K, q, 0)
            wt = to_out_dtype(q.to(tl.float32) * scale[None, :], xt.dtype, OUT_BF16)
        else:
            q = codes_tile(packed, base1, base2, 0, K, N, n0, k0, W0, W1, W2, XOR, OFFSET, BN, BK, ALIGNED)
            q = tl.where(kk[None, :] < K, q, 0)
            wt = tl.trans(to_out_dtype(q.to(tl.float32) * scale[:, None], xt.dtype, OUT_BF16))
        # fp32 operands: fp16/bf16 values are exact in TF32, so the products are exact on tensor cores and
        # in the interpreter alike (whose dot cannot multiply bf16); rows past N have scale 0.
        acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision=PRECISION)
    tl.store(y + m[:, None] * N + n[None, :], to_out_dtype(acc, y.dtype.element_ty, OUT_BF16),
             mask=(m[:, None] < M) & (n[None, :] < N))
