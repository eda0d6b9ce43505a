"""Dequantization kernels for packed golfquant weights: Triton on CUDA (optional), bit-exact torch references.

`golfquant` may import this package; it never imports `golfquant`. Without triton everything runs on the
torch reference path. Set TRITON_INTERPRET=1 before importing to run the Triton kernels on CPU tensors.
"""
from kernels.dequant import (KernelConfig, LayoutSpec, PackedWeight, Rotation, dequantize_packed, dequantize_reference,
                             lowrank_reference, parse_layout, unpack_reference, unrotate)
from kernels.matmul import FUSED_MAX_ROWS, MatmulConfig, dequant_matmul, dequant_matmul_reference
from kernels.quant_linear import QuantLinear, swap_linears

__all__ = [
    "FUSED_MAX_ROWS", "KernelConfig", "LayoutSpec", "MatmulConfig", "PackedWeight", "QuantLinear", "Rotation",
    "dequant_matmul", "dequant_matmul_reference", "dequantize_packed", "dequantize_reference",
    "lowrank_reference", "parse_layout", "swap_linears", "unpack_reference", "unrotate",
]
