"""Empirical entropy bounds of integer codes, the yardsticks a size report prints next to coded sizes.

All functions view the codes as a 2-D matrix `[-1, last dim]` (a 1-D array is one row) and return total bits.
* order-0: one histogram for the whole tensor;
* row / column conditional: one histogram per row / per column, i.e. sum over rows of count x H(row).
A coder that adapts to each row's (or column's) spread can reach the conditional bound, which lies below the
order-0 one; none of them sees cross-row redundancy (repeated rows), which LZ codecs can exploit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_matrix(codes) -> np.ndarray:
    a = np.asarray(codes)
    if a.ndim == 0:
        return a.reshape(1, 1)
    return a.reshape(-1, a.shape[-1]) if a.size else a.reshape(0, 0)


def _bits_of_histograms(counts: np.ndarray) -> float:
    """Sum over histograms (rows of `counts`) of n * H(histogram) = sum c*log2(n/c)."""
    counts = counts.astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    nz = counts > 0
    ratio = np.divide(totals, counts, out=np.ones_like(counts), where=nz)
    return float((counts * np.log2(ratio)).sum())


def _histograms(m: np.ndarray) -> np.ndarray:
    """Per-row histograms of an int matrix, bins from m.min() to m.max()."""
    if m.size == 0:
        return np.zeros((0, 1), np.int64)
    lo = int(m.min())
    span = int(m.max()) - lo + 1
    idx = (m.astype(np.int64) - lo) + span * np.arange(m.shape[0], dtype=np.int64)[:, None]
    return np.bincount(idx.ravel(), minlength=span * m.shape[0]).reshape(m.shape[0], span)


def order0_bits(codes) -> float:
    """n x H(codes) with one histogram for the whole tensor."""
    m = _as_matrix(codes)
    return _bits_of_histograms(_histograms(m.reshape(1, -1))) if m.size else 0.0


def row_conditional_bits(codes) -> float:
    """Sum over rows of count x H(row): the bound for a coder with one exact table per row."""
    return _bits_of_histograms(_histograms(_as_matrix(codes)))


def column_conditional_bits(codes) -> float:
    """Sum over columns of count x H(column)."""
    return _bits_of_histograms(_histograms(_as_matrix(codes).T))


@dataclass(frozen=True)
class EntropyBounds:
    """The three bounds in bytes (bits / 8, tables not counted)."""

    order0: float
    rows: float
    cols: float


def bytes_bound(codes) -> EntropyBounds:
    return EntropyBounds(order0_bits(codes) / 8, row_conditional_bits(codes) / 8, column_conditional_bits(codes) / 8)
