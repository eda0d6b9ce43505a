"""Empirical entropy of integer codes (or bytes): the one definition every bound and entropy-based price uses.

`histogram_bits` is the formula: a histogram of n values with counts c costs sum c·log2(n/c) bits (n x H).
The other functions view the values as a 2-D matrix `[-1, last dim]` (a 1-D array is one row) and return bits:
* order-0: one histogram for the whole tensor;
* row / column conditional: one histogram per row / per column, i.e. sum over rows of count x H(row).
A coder that adapts to each row's (or column's) spread can reach the conditional bound, which lies below the
order-0 one; none of them sees cross-row redundancy (repeated rows), which LZ codecs can exploit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def histogram_bits(counts: np.ndarray) -> np.ndarray:
    """n x H of each histogram along the last axis of `counts` (n its total): sum over counts c of c·log2(n/c)."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=-1, keepdims=True)
    ratio = np.divide(totals, counts, out=np.ones_like(counts), where=counts > 0)
    return (counts * np.log2(ratio)).sum(axis=-1)


def _as_matrix(values) -> np.ndarray:
    a = np.frombuffer(values, np.uint8) if isinstance(values, (bytes, bytearray, memoryview)) else np.asarray(values)
    if a.ndim == 0:
        return a.reshape(1, 1)
    return a.reshape(-1, a.shape[-1]) if a.size else a.reshape(0, 0)


def _histograms(m: np.ndarray) -> np.ndarray:
    """Per-row histograms of an int matrix, bins from m.min() to m.max()."""
    if m.size == 0:
        return np.zeros((0, 1), np.int64)
    lo = int(m.min())
    span = int(m.max()) - lo + 1
    idx = (m.astype(np.int64) - lo) + span * np.arange(m.shape[0], dtype=np.int64)[:, None]
    return np.bincount(idx.ravel(), minlength=span * m.shape[0]).reshape(m.shape[0], span)


def order0_bits(values) -> float:
    """n x H(values) with one histogram for the whole tensor (or byte string)."""
    m = _as_matrix(values)
    if m.dtype in (np.int8, np.uint8):  # 256 fixed bins (entropy ignores the bins' order): no min/max pass
        return float(histogram_bits(np.bincount(m.reshape(-1).view(np.uint8), minlength=256)))
    return float(histogram_bits(_histograms(m.reshape(1, -1))).sum())


def row_bits(values) -> np.ndarray:
    """count x H(row) for each row of the values viewed as a matrix."""
    return histogram_bits(_histograms(_as_matrix(values)))


def row_conditional_bits(values) -> float:
    """Sum over rows of count x H(row): the bound for a coder with one exact table per row."""
    return float(row_bits(values).sum())


def column_conditional_bits(values) -> float:
    """Sum over columns of count x H(column)."""
    return float(row_bits(_as_matrix(values).T).sum())


@dataclass(frozen=True)
class EntropyBounds:
    """The three bounds in bytes (bits / 8, tables not counted)."""

    order0: float
    rows: float
    cols: float


def bytes_bound(codes) -> EntropyBounds:
    return EntropyBounds(order0_bits(codes) / 8, row_conditional_bits(codes) / 8, column_conditional_bits(codes) / 8)
