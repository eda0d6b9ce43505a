"""Dequantize packed integer codes (docs/architecture.md, "Bit layouts") into float weights.

The result is defined, bit for bit, by `dequantize_reference` (pure torch):
    w = ([unrotate](q.float32 * scale.float32 [+ lowrank_reference(A, B)])).to(dtype)
where q comes from the packed bytes (offset-binary planes, nibbles or signed int8 bytes, optionally stored in
transposed order) and `lowrank_reference` sums the LQER rank-1 terms A[:, j] * B[j, :] in order j = 0..r-1,
one fp32 multiply and one fp32 add each, from zero. The Triton kernel does the same operations in the same order
with fp contraction off, so it matches the reference exactly for fp32, fp16 and bf16 (bf16 is rounded to nearest
even by hand, because the Triton interpreter's bf16 cast truncates). golfquant's QuantizedTensor.dequantize and
its exported loader call `lowrank_reference` too, so every path gives the same bits. A weight quantized in a
Hadamard-rotated basis (`Rotation`) is turned back by `unrotate` in fp32 after that sum and before the cast, in
torch on every path (after the Triton kernel's fp32 output), so it adds no kernel and agrees bit for bit too.

One Triton kernel serves every layout: plane widths, offset and transposition are constexprs, so each layout
compiles to its own specialised kernel (element indices are int32: fewer than 2**31 codes per tensor).
`kernels` imports without triton; only the reference path then works.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the torch reference path needs nothing else
    triton = None
    tl = None

# Kernels are built when this module is imported; under TRITON_INTERPRET=1 they run on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LAYOUTS = ("int8", "nibble", "planes")
BACKENDS = ("auto", "triton", "torch")
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class LayoutSpec:
    """How one layout stores codes of width `bits`: planes of `widths` bits (low plane first), each element
    read as u, then q = (u ^ xor) - offset (offset-binary: xor 0, offset 2**(bits-1); int8 bytes: the two's
    complement byte, xor 0x80 and offset 128)."""

    bits: int
    widths: tuple[int, ...]
    xor: int
    offset: int
    transposed: bool


class Rotation(NamedTuple):
    """W was quantized as W·R, R = diag(signs(seed))·blockdiag(H_B/√B) with B = block: the stored value
    dequantizes to dequant·Rᵀ (`unrotate`). R is orthonormal, so the error in either basis is the same."""

    block: int
    seed: int


class PackedWeight(NamedTuple):
    """A quantized weight as stored: codes still in their bit layout (golfquant's packed artifact reader makes
    these; QuantLinear and swap_linears take them)."""

    packed: torch.Tensor  # uint8, 1-D
    bits: int
    layout: str
    shape: tuple[int, ...]
    scales: torch.Tensor  # fp16 [shape[:-1]]
    lqer: tuple[torch.Tensor, torch.Tensor] | None = None  # fp32 A [rows, r], B [r, cols]
    # salient column groups: (their column indexes, int64 [k], and their codes [..., rows, k] as a weight of its own)
    salient: tuple[torch.Tensor, PackedWeight] | None = None
    rotation: Rotation | None = None

    def to(self, device: str | torch.device) -> PackedWeight:
        lqer = None if self.lqer is None else (self.lqer[0].to(device), self.lqer[1].to(device))
        salient = None if self.salient is None else (self.salient[0].to(device), self.salient[1].to(device))
        return self._replace(packed=self.packed.to(device), scales=self.scales.to(device), lqer=lqer, salient=salient)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> torch.Tensor:
        """dequantize_packed of this weight, on its device; salient groups through the same kernel, written into
        their columns. Bit-exact: the LQER sum is elementwise, so the salient part adds the same terms (B's
        salient columns) to its own columns. A rotation mixes columns, so it is undone after the salient columns
        are in place: both parts are then decoded in fp32 and the one rounding to dtype comes after `unrotate`."""
        if self.salient is None:
            return dequantize_packed(self.packed, self.bits, self.layout, self.shape, self.scales, self.lqer, dtype,
                                     backend, rotation=self.rotation)
        inner = dtype if self.rotation is None else torch.float32
        w = dequantize_packed(self.packed, self.bits, self.layout, self.shape, self.scales, self.lqer, inner, backend)
        cols, sub = self.salient
        lqer = None if self.lqer is None else (self.lqer[0], self.lqer[1][:, cols].contiguous())
        w.index_copy_(-1, cols, sub._replace(lqer=lqer).dequantize(inner, backend))
        if self.rotation is None:
            return w
        check_rotation(self.rotation, self.shape)
        return unrotate(w, *self.rotation).to(dtype)


@dataclass(frozen=True)
class KernelConfig:
    """Tile of one dequant program: block_rows x block_cols outputs (powers of two, >= 8)."""

    block_rows: int = 32
    block_cols: int = 128
    num_warps: int = 4


def plane_widths(bits: int) -> tuple[int, ...]:
    """Greedy split of `bits` into planes of 4, 2 and 1 bits (6 = 4+2, 5 = 4+1, 7 = 4+2+1, 8 = 4+4)."""
    widths, left = [], bits
    for w in (4, 2, 1):
        while left >= w:
            widths.append(w)
            left -= w
    return tuple(widths)


def parse_layout(bits: int, layout: str) -> LayoutSpec:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    base, transposed = (layout[:-2], True) if layout.endswith(".T") else (layout, False)
    if base not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}, optionally with '.T'")
    if base == "int8":
        return LayoutSpec(bits, (8,), 0x80, 128, transposed)
    if base == "nibble":
        if bits > 4:
            raise ValueError(f"layout 'nibble' holds at most 4 bits, got {bits}; use 'planes' or 'int8'")
        return LayoutSpec(bits, (4,), 0, 2 ** (bits - 1), transposed)
    return LayoutSpec(bits, plane_widths(bits), 0, 2 ** (bits - 1), transposed)


def packed_nbytes(numel: int, spec: LayoutSpec) -> int:
    """Bytes of a packed tensor: each plane is padded to a whole byte."""
    return sum(-(-numel * w // 8) for w in spec.widths)


def _stream_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    return shape[:-2] + (shape[-1], shape[-2]) if transposed else shape


def unpack_reference(packed: torch.Tensor, bits: int, layout: str, shape) -> torch.Tensor:
    """Codes (int8, `shape`) from packed bytes (uint8 tensor), in torch on the bytes' device."""
    spec = parse_layout(bits, layout)
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    check_packed(packed, spec, shape)
    u = torch.zeros(numel, dtype=torch.int32, device=packed.device)
    start, low = 0, 0
    for w in spec.widths:
        nbytes = -(-numel * w // 8)
        chunk = packed[start:start + nbytes].to(torch.int32)
        shifts = torch.arange(0, 8, w, dtype=torch.int32, device=packed.device)
        vals = ((chunk[:, None] >> shifts) & ((1 << w) - 1)).reshape(-1)[:numel]
        u |= vals << low
        start, low = start + nbytes, low + w
    q = ((u ^ spec.xor) - spec.offset).to(torch.int8).reshape(_stream_shape(shape, spec.transposed))
    return q.mT.contiguous() if spec.transposed else q


def lowrank_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A @ B for LQER as every path computes it: rank-1 terms added in order to zeros, each a multiply then an
    add (a BLAS matmul sums in its own order and may fuse, so it is not reproducible by a kernel)."""
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    for j in range(a.shape[1]):
        acc = acc + a[:, j:j + 1] * b[j:j + 1, :]
    return acc


def hadamard_signs(seed: int, n: int, device=None) -> torch.Tensor:
    """±1 (fp32) for columns 0..n-1: a 32-bit integer hash of (seed, column), in int64 ops that never overflow
    (every product stays below 2^63), so that every device and the exported loader draw the same signs."""
    x = (torch.arange(n, dtype=torch.int64, device=device) + seed * 0x9E3779B1) & 0xFFFFFFFF
    for _ in range(2):  # two rounds of a 32-bit multiply-xorshift mixer (0x45D9F3B)
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return 1.0 - 2.0 * ((x ^ (x >> 16)) & 1).to(torch.float32)


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., n] times blockdiag(H_B/√B) on the last dim, B = block (a power of two dividing n), in fp32.

    Butterflies in place, log2(B) stages, a fixed order of fp32 adds and one final multiply and no matmul (a
    BLAS would sum in its own order): every path gets the same bits. H_B is symmetric, so this is also Rᵀ's."""
    y = x.to(torch.float32).reshape(-1, block).clone()
    h = 1
    while h < block:
        v = y.view(-1, block // (2 * h), 2, h)
        a, b = v[:, :, 0], v[:, :, 1]
        d = a - b
        a += b
        b.copy_(d)
        h *= 2
    return (y * torch.tensor(block ** -0.5, dtype=torch.float32, device=y.device)).reshape(x.shape)


def unrotate(w: torch.Tensor, block: int, seed: int) -> torch.Tensor:
    """w·Rᵀ on the last dim (the inverse of golfquant.quant.rotate.rotate): Hadamard blocks, then the signs."""
    return fwht(w, block) * hadamard_signs(seed, w.shape[-1], w.device)


def dequantize_reference(packed: torch.Tensor, bits: int, layout: str, shape, scales: torch.Tensor,
                         lqer: tuple[torch.Tensor, torch.Tensor] | None = None,
                         dtype: torch.dtype = torch.bfloat16, rotation: Rotation | None = None) -> torch.Tensor:
    """The definition the kernels match bit for bit (see the module docstring)."""
    q = unpack_reference(packed, bits, layout, shape)
    check_scales(scales, q.shape)
    w = q.to(torch.float32) * scales.to(torch.float32).unsqueeze(-1)
    if lqer is not None:
        check_lqer(lqer, q.shape)
        w = w + lowrank_reference(*lqer)
    if rotation is not None:
        check_rotation(rotation, q.shape)
        w = unrotate(w, *rotation)
    return w.to(dtype)


def dequantize_packed(packed: torch.Tensor, bits: int, layout: str, shape, scales: torch.Tensor,
                      lqer: tuple[torch.Tensor, torch.Tensor] | None = None,
                      dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
                      config: KernelConfig | None = None, rotation: Rotation | None = None) -> torch.Tensor:
    """Weights [*shape] in `dtype` from packed codes (uint8 tensor), fp16 scales [shape[:-1]], optional
    LQER factors (A [rows, r], B [r, cols], fp32) and optional rotation. backend: 'auto' (Triton on CUDA tensors
    when triton is importable, else torch), 'triton' (also CPU tensors under TRITON_INTERPRET=1), 'torch'."""
    if not use_triton(backend, packed.device):
        return dequantize_reference(packed, bits, layout, shape, scales, lqer, dtype, rotation)
    spec = parse_layout(bits, layout)
    shape = tuple(int(d) for d in shape)
    check_packed(packed, spec, shape)
    check_scales(scales, shape)
    if lqer is not None:
        check_lqer(lqer, shape)
    if rotation is None:
        return _dequant_triton(packed, spec, shape, scales, lqer, dtype, config or KernelConfig())
    check_rotation(rotation, shape)
    # the kernel's fp32 output is the reference's before its rotation: turn it back in torch, then round once
    w = _dequant_triton(packed, spec, shape, scales, lqer, torch.float32, config or KernelConfig())
    return unrotate(w, *rotation).to(dtype)


def use_triton(backend: str, device: torch.device) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return triton is not None and device.type == "cuda"
    if triton is None:
        raise ValueError("backend='triton' needs the triton package (pip install 'golfquant[triton]')")
    if device.type != "cuda" and not INTERPRET:
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing kernels")
    return True


def check_packed(packed: torch.Tensor, spec: LayoutSpec, shape: tuple[int, ...]) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if spec.transposed and len(shape) < 2:
        raise ValueError(f"a transposed layout needs a shape of >= 2 dims, got {shape}")
    want = packed_nbytes(math.prod(shape), spec)
    if packed.numel() != want:
        raise ValueError(f"packed holds {packed.numel()} bytes; {spec.bits}-bit codes of shape {shape} "
                         f"in planes {spec.widths} need {want}")


def check_scales(scales: torch.Tensor, shape) -> None:
    if scales.dtype != torch.float16 or tuple(scales.shape) != tuple(shape[:-1]):
        raise ValueError(f"scales must be float16 of shape {tuple(shape[:-1])}, "
                         f"got {scales.dtype} {tuple(scales.shape)}")


def check_lqer(lqer, shape) -> None:
    a, b = lqer
    if len(shape) != 2 or a.dtype != torch.float32 or b.dtype != torch.float32 or a.dim() != 2 \
            or tuple(b.shape) != (a.shape[1], shape[1]) or a.shape[0] != shape[0]:
        raise ValueError(f"LQER factors must be fp32 A [{shape[0]}, r] and B [r, {shape[-1]}] for a 2-D weight "
                         f"{tuple(shape)}, got A {a.dtype} {tuple(a.shape)} and B {b.dtype} {tuple(b.shape)}")


def check_rotation(rotation, shape) -> None:
    block, seed = rotation
    if not (len(shape) >= 1 and type(block) is int and type(seed) is int and 2 <= block <= shape[-1]
            and block & (block - 1) == 0 and shape[-1] % block == 0 and 0 <= seed < 2 ** 31):
        raise ValueError(f"rotation {tuple(rotation)} does not fit shape {tuple(shape)}: block a power of two >= 2 "
                         "dividing the last dim, seed in [0, 2^31)")


def plane_bases(numel: int, spec: LayoutSpec) -> tuple[int, int]:
    """Byte offsets of the second and third planes (0 where absent)."""
    sizes = [-(-numel * w // 8) for w in spec.widths] + [0, 0]
    return sizes[0], sizes[0] + sizes[1]


def kernel_widths(spec: LayoutSpec) -> tuple[int, int, int]:
    return (spec.widths + (0, 0))[:3]


def is_aligned(line_len: int, spec: LayoutSpec) -> bool:
    """Every stream line starts on a byte boundary in every plane, so a tile's bytes are contiguous rows."""
    return line_len % (8 // min(spec.widths)) == 0


def _dequant_triton(packed, spec, shape, scales, lqer, dtype, config: KernelConfig) -> torch.Tensor:
    rows, cols = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, shape[-1])
    slices = math.prod(shape[:-2])
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if out.numel() == 0:
        return out
    a, b = (t.contiguous() for t in lqer) if lqer is not None else (scales, scales)  # unused when RANK == 0
    base1, base2 = plane_bases(out.numel(), spec)
    w0, w1, w2 = kernel_widths(spec)
    grid = (triton.cdiv(rows, config.block_rows), triton.cdiv(cols, config.block_cols), slices)
    _dequant_kernel[grid](
        packed, scales.contiguous(), a, b, out, rows, cols, base1, base2,
        W0=w0, W1=w1, W2=w2, XOR=spec.xor, OFFSET=spec.offset, TRANSPOSED=spec.transposed,
        ALIGNED=is_aligned(rows if spec.transposed else cols, spec),
        RANK=0 if lqer is None else lqer[0].shape[1], OUT_BF16=dtype == torch.bfloat16,
        BR=config.block_rows, BC=config.block_cols, num_warps=config.num_warps,
        enable_fp_fusion=False)  # a fused multiply-add would round once where the reference rounds twice
    return out


def triton_jit(fn):
    """triton.jit when triton is present; without it the kernels are never launched."""
    return triton.jit(fn) if triton is not None else fn


@triton_jit
def _spread(b, W: tl.constexpr, EPB: tl.constexpr):
    """[L, n] bytes -> [L, n * EPB] fields of W bits, field i of a byte at bit i*W (LSB first).

    Nested interleaves keep each byte's fields in one thread's registers (no shuffle through shared memory)."""
    M: tl.constexpr = (1 << W) - 1
    if EPB == 1:
        out = b
    elif EPB == 2:
        out = tl.interleave(b & M, (b >> W) & M)
    elif EPB == 4:
        out = tl.interleave(tl.interleave(b & M, (b >> 2 * W) & M),
                            tl.interleave((b >> W) & M, (b >> 3 * W) & M))
    else:
        evens = tl.interleave(tl.interleave(b & M, (b >> 4 * W) & M),
                              tl.interleave((b >> 2 * W) & M, (b >> 6 * W) & M))
        odds = tl.interleave(tl.interleave((b >> W) & M, (b >> 5 * W) & M),
                             tl.interleave((b >> 3 * W) & M, (b >> 7 * W) & M))
        out = tl.interleave(evens, odds)
    return out


@triton_jit
def _plane_tile(packed, base, first, line_len, n_lines, line0, k0,
                W: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, ALIGNED: tl.constexpr):
    """One plane's fields for a [BL, BK] tile in stream order: lines line0.., elements k0.. of each line
    (element e of line l is stream element first + l*line_len + e)."""
    EPB: tl.constexpr = 8 // W
    lines = line0 + tl.arange(0, BL)
    if ALIGNED:
        # Lines start on byte boundaries: load the tile's bytes as contiguous rows, split each into EPB fields.
        kb = k0 // EPB + tl.arange(0, BK // EPB)
        ptrs = packed + base + (first + lines[:, None] * line_len) // EPB + kb[None, :]
        ok = (lines[:, None] < n_lines) & (kb[None, :] < line_len // EPB)
        out = _spread(tl.load(ptrs, mask=ok, other=0).to(tl.int32), W, EPB)
    else:
        ks = k0 + tl.arange(0, BK)
        idx = first + lines[:, None] * line_len + ks[None, :]
        ok = (lines[:, None] < n_lines) & (ks[None, :] < line_len)
        byte = tl.load(packed + base + idx // EPB, mask=ok, other=0).to(tl.int32)
        out = (byte >> ((idx % EPB) * W)) & ((1 << W) - 1)
    return out


@triton_jit
def codes_tile(packed, base1, base2, first, line_len, n_lines, line0, k0,
               W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, XOR: tl.constexpr, OFFSET: tl.constexpr,
               BL: tl.constexpr, BK: tl.constexpr, ALIGNED: tl.constexpr):
    """Signed codes (int32) of a [BL, BK] tile in stream order, planes combined low plane first."""
    u = _plane_tile(packed, 0, first, line_len, n_lines, line0, k0, W0, BL, BK, ALIGNED)
    if W1 > 0:
        u = u | (_plane_tile(packed, base1, first, line_len, n_lines, line0, k0, W1, BL, BK, ALIGNED) << W0)
    if W2 > 0:
        u = u | (_plane_tile(packed, base2, first, line_len, n_lines, line0, k0, W2, BL, BK, ALIGNED) << (W0 + W1))
    return (u ^ XOR) - OFFSET


@triton_jit
def to_out_dtype(x, dtype: tl.constexpr, OUT_BF16: tl.constexpr):
    """fp32 -> dtype; bf16 by integer round-to-nearest-even (the GPU's cvt.rn, which the interpreter lacks)."""
    if OUT_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out


@triton_jit
def _dequant_kernel(packed, scales, lqer_a, lqer_b, out, rows, cols, base1, base2,
                    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, XOR: tl.constexpr, OFFSET: tl.constexpr,
                    TRANSPOSED: tl.constexpr, ALIGNED: tl.constexpr, RANK: tl.constexpr, OUT_BF16: tl.constexpr,
                    BR: tl.constexpr, BC: tl.constexpr):
    r0 = tl.program_id(0) * BR
    c0 = tl.program_id(1) * BC
    s = tl.program_id(2)
    first = s * rows * cols
    if TRANSPOSED:  # the stream runs down columns: tile it as [cols, rows] and turn it
        q = tl.trans(codes_tile(packed, base1, base2, first, rows, cols, c0, r0,
                                W0, W1, W2, XOR, OFFSET, BC, BR, ALIGNED))
    else:
        q = codes_tile(packed, base1, base2, first, cols, rows, r0, c0, W0, W1, W2, XOR, OFFSET, BR, BC, ALIGNED)
    r = r0 + tl.arange(0, BR)
    c = c0 + tl.arange(0, BC)
    scale = tl.load(scales + s * rows + r, mask=r < rows, other=0).to(tl.float32)
    w = q.to(tl.float32) * scale[:, None]
    if RANK > 0:
        lq = tl.zeros((BR, BC), dtype=tl.float32)
        for j in range(RANK):
            a = tl.load(lqer_a + r * RANK + j, mask=r < rows, other=0)
            b = tl.load(lqer_b + j * cols + c, mask=c < cols, other=0)
            lq = lq + a[:, None] * b[None, :]
        w = w + lq
    ok = (r[:, None] < rows) & (c[None, :] < cols)
    tl.store(out + first + r[:, None] * cols + c[None, :],
             to_out_dtype(w, out.dtype.element_ty, OUT_BF16), mask=ok)
