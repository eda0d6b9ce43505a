"""The quantized-tensor value type shared by quantizers, packers, the artifact and the kernels.

Codes are symmetric integers in [-qmax(bits), qmax(bits)] held in int8; scales are fp16, one per output row
(shape codes.shape[:-1]). Dequantization is one fp32 product (salient column groups, when present, replaced by
their own codes times their own row scales), plus for LQER the fp32 sum of A @ B's rank-1 terms in order
(kernels.lowrank_reference, the order the Triton kernel and the exported loader use too), rounded once to the
output dtype, so every path agrees bit for bit. A tensor quantized in a rotated basis (`rotation`, see
golfquant.quant.rotate) is turned back last, after the salient columns and LQER (both chosen and fitted in that
basis), by kernels.unrotate in fp32.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kernels.dequant import MAX_BITS, MIN_BITS, Rotation, lowrank_reference, unrotate  # as the kernels decode


def qmax(bits: int) -> int:
    """Largest code magnitude for a symmetric `bits`-wide quantizer (int4 -> 7, int6 -> 31)."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return 2 ** (bits - 1) - 1


def lqer_b_scale_count(rank: int, cols: int, group: int) -> int:
    """Number of B's group scales: ceil(rank * cols / group), in integers (exact at any size)."""
    return -(-rank * cols // group)


@dataclass
class LowRankFactors:
    """LQER correction W ~ q*s + A @ B, with A [rows, r] and B [r, cols] stored quantized.

    a_codes: int8 [rows, r] with one fp16 scale for the whole matrix (a_scale, shape []);
    b_codes: int8 [r, cols] with fp16 scales per group of `group` consecutive elements of B flattened
    (b_scales, shape [lqer_b_scale_count(r, cols, group)]). A and B are exact in fp32 (an int8 code times an
    fp16 scale); their product is not, so its summation order is fixed (product).
    """

    a_codes: torch.Tensor
    a_scale: torch.Tensor
    a_bits: int
    b_codes: torch.Tensor
    b_scales: torch.Tensor
    b_bits: int
    group: int

    def a(self) -> torch.Tensor:
        return self.a_codes.to(torch.float32) * self.a_scale.to(torch.float32)

    def b(self) -> torch.Tensor:
        flat = self.b_codes.reshape(-1).to(torch.float32)
        # indexing, not repeat: a forged huge group costs nothing
        group_of = torch.arange(flat.numel(), device=flat.device) // self.group
        return (flat * self.b_scales.to(torch.float32)[group_of]).reshape(self.b_codes.shape)

    def product(self) -> torch.Tensor:
        """A @ B in fp32, rank-1 terms summed in order (a BLAS matmul sums in an order of its own)."""
        return lowrank_reference(self.a(), self.b())


def salient_columns(groups, group):
    """Input columns of the salient groups: `group` consecutive columns per group index, in ascending order."""
    return (torch.tensor(groups, dtype=torch.int64)[:, None] * group + torch.arange(group)).reshape(-1)


@dataclass
class SalientColumns:
    """Groups of `group` consecutive input columns stored at a higher width `bits` with row scales of their own.

    codes: int8 [..., rows, len(groups)*group], the columns of salient_columns(groups, group) in order;
    scales: fp16 [..., rows]. The main codes hold 0 in these columns."""

    groups: tuple[int, ...]
    group: int
    codes: torch.Tensor
    scales: torch.Tensor
    bits: int

    def columns(self) -> torch.Tensor:
        return salient_columns(self.groups, self.group).to(self.codes.device)

    def dequantize(self) -> torch.Tensor:
        return self.codes.to(torch.float32) * self.scales.to(torch.float32).unsqueeze(-1)


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # int8, the weight's shape
    scales: torch.Tensor  # fp16, codes.shape[:-1]
    bits: int
    lqer: LowRankFactors | None = None
    salient: SalientColumns | None = None
    rotation: Rotation | None = None

    def __post_init__(self) -> None:
        if self.codes.dtype != torch.int8:
            raise TypeError(f"codes must be int8, got {self.codes.dtype}")
        if self.scales.dtype != torch.float16:
            raise TypeError(f"scales must be float16, got {self.scales.dtype}")
        if tuple(self.scales.shape) != tuple(self.codes.shape[:-1]):
            raise ValueError(f"scales shape {tuple(self.scales.shape)} != codes rows {tuple(self.codes.shape[:-1])}")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def to(self, device: str | torch.device) -> "QuantizedTensor":
        lqer = self.lqer
        if lqer is not None:
            lqer = dataclasses.replace(lqer, a_codes=lqer.a_codes.to(device), a_scale=lqer.a_scale.to(device),
                                       b_codes=lqer.b_codes.to(device), b_scales=lqer.b_scales.to(device))
        sal = self.salient
        if sal is not None:
            sal = dataclasses.replace(sal, codes=sal.codes.to(device), scales=sal.scales.to(device))
        return QuantizedTensor(self.codes.to(device), self.scales.to(device), self.bits, lqer, sal, self.rotation)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.codes.to(torch.float32) * self.scales.to(torch.float32).unsqueeze(-1)
        if self.salient is not None:  # before LQER: the correction is fitted to the mixed tensor's error
            w = w.index_copy(-1, self.salient.columns(), self.salient.dequantize())
        if self.lqer is not None:
            w = w + self.lqer.product()
        if self.rotation is not None:
            w = unrotate(w, *self.rotation)
        return w.to(dtype)
