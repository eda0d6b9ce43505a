"""Selective ±1 pruning (brief §2.9): zero the cheapest ±1 codes until the codes fit a byte target.

Cost of zeroing code q_ij = ±1 of a row with scale s_i: s_i² · H_jj, the diagonal part of the increase of the
Hessian-weighted error tr(E H Eᵀ) (the exact increase adds 2 q_ij s_i (E H)_ij; the records, whose cost is s_i²,
drop such terms, and so do we, which keeps the order independent of the float weights). Without a Hessian H_jj is
a constant: the caller's `h_default` (e.g. the median mean(diag H) of the tensors that have one), so both kinds
compete in one order. Only codes equal to ±1 are touched, and only
to 0. The global order is by cost, then by tensor, then by element index: deterministic.

Bytes come from per-tensor pricing functions, codes -> bytes, that must follow the codes' histogram (the budget
search passes golfquant.codec.sizemodel.ScaledEntropyPricer: the order-0 entropy of the codes times the real/entropy
ratio of the tensor's last encoding); `prune_to_bytes` binary-searches the number of pruned codes. The caller
confirms by encoding and calls again with the target moved by the real size's excess (or shortfall).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from golfquant.quant.qtensor import QuantizedTensor

Pricer = Callable[[np.ndarray], float]  # codes (the tensor's shape, int8) -> estimated bytes


@dataclass(frozen=True)
class _Order:
    """The ±1 codes of every tensor, in the global pruning order."""

    names: list[str]
    owner: np.ndarray  # tensor index of the k-th cheapest code
    index: np.ndarray  # its flat element index
    cost: np.ndarray


@dataclass
class PruneResult:
    tensors: dict[str, QuantizedTensor]
    pruned: int  # codes set from ±1 to 0
    candidates: int  # ±1 codes there were
    estimated_bytes: float  # priced codes bytes of the pruned tensors
    error_added: float  # sum of the pruned codes' costs


def prune_costs(qt: QuantizedTensor, h_diag: torch.Tensor | None, h_default: float = 1.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices of the ±1 codes, their costs s_row² · H_jj) of one tensor.

    h_diag: diag(H) [cols], or [S, cols] for a bank with one Hessian per slice; None: h_default everywhere."""
    codes = qt.codes
    flat = codes.reshape(-1)
    idx = torch.nonzero(flat.abs() == 1).reshape(-1)
    cols = codes.shape[-1]
    s2 = qt.scales.float().reshape(-1).double() ** 2  # one per row of codes.reshape(-1, cols)
    row = idx // cols
    if h_diag is None:
        h = torch.full((idx.numel(),), float(h_default), dtype=torch.float64)
    else:
        hd = h_diag.double()
        if hd.dim() == 1:
            h = hd[idx % cols]
        else:  # one diagonal per bank slice of rows_per_slice rows
            rows_per_slice = codes.shape[-2]
            h = hd[row // rows_per_slice, idx % cols]
    return idx.numpy(), (s2[row] * h.clamp_min(0)).numpy()


def _global_order(tensors: Mapping[str, QuantizedTensor], costs: Mapping[str, tuple[np.ndarray, np.ndarray]]
                  ) -> _Order:
    names = [n for n in tensors if n in costs]
    owner = np.concatenate([np.full(costs[n][0].size, i, np.int64) for i, n in enumerate(names)] or [np.zeros(0)])
    index = np.concatenate([costs[n][0] for n in names] or [np.zeros(0, np.int64)]).astype(np.int64)
    cost = np.concatenate([costs[n][1] for n in names] or [np.zeros(0)])
    order = np.lexsort((index, owner, cost))
    return _Order(names, owner[order].astype(np.int64), index[order], cost[order])


def _apply(tensors: Mapping[str, QuantizedTensor], order: _Order, n: int) -> dict[str, QuantizedTensor]:
    """The tensors with the first n codes of the order zeroed (untouched tensors are shared, not copied)."""
    out = dict(tensors)
    owner, index = order.owner[:n], order.index[:n]
    for i, name in enumerate(order.names):
        picked = index[owner == i]
        if picked.size == 0:
            continue
        qt = tensors[name]
        codes = qt.codes.clone()
        codes.view(-1)[torch.from_numpy(picked)] = 0
        out[name] = dataclasses.replace(qt, codes=codes)  # LQER, salient groups and rotation kept
    return out


def _priced(tensors: Mapping[str, QuantizedTensor], pricers: Mapping[str, Pricer], base: dict[str, float],
            order: _Order, n: int) -> float:
    touched = {order.names[i] for i in np.unique(order.owner[:n])}
    pruned = _apply({k: tensors[k] for k in touched}, order, n)
    return sum(pricers[k](pruned[k].codes.numpy()) if k in touched else base[k] for k in pricers)


def prune_to_bytes(tensors: Mapping[str, QuantizedTensor], costs: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   pricers: Mapping[str, Pricer], target_bytes: float) -> PruneResult | None:
    """Prune the fewest codes, in the global cost order, so that the priced codes bytes are <= target_bytes.

    costs: name -> prune_costs(...) for the tensors that may be pruned; pricers: name -> bytes of its codes, for
    every tensor whose codes count toward the target. Returns None when even pruning every candidate is not
    enough (the caller says what is reachable: `pruned_floor`)."""
    order = _global_order(tensors, costs)
    base = {k: pricers[k](tensors[k].codes.numpy()) for k in pricers}
    total = order.cost.size
    if sum(base.values()) <= target_bytes:
        return PruneResult(dict(tensors), 0, total, sum(base.values()), 0.0)
    if _priced(tensors, pricers, base, order, total) > target_bytes:
        return None
    lo, hi = 0, total  # priced(lo) > target >= priced(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _priced(tensors, pricers, base, order, mid) <= target_bytes:
            hi = mid
        else:
            lo = mid
    return PruneResult(_apply(tensors, order, hi), hi, total, _priced(tensors, pricers, base, order, hi),
                       float(order.cost[:hi].sum()))


def pruned_floor(tensors: Mapping[str, QuantizedTensor], costs: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 pricers: Mapping[str, Pricer]) -> float:
    """Priced codes bytes with every ±1 candidate pruned: the least pruning can reach."""
    order = _global_order(tensors, costs)
    base = {k: pricers[k](tensors[k].codes.numpy()) for k in pricers}
    return _priced(tensors, pricers, base, order, order.cost.size)
