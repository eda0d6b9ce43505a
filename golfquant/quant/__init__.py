"""Quantizers: each turns a float tensor into a QuantizedTensor (codes + per-row scales)."""
from golfquant.quant.qtensor import LowRankFactors, QuantizedTensor, qmax

__all__ = ["LowRankFactors", "QuantizedTensor", "qmax"]
