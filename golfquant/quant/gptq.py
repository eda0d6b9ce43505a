"""Cholesky GPTQ (Frantar et al. 2023) at per-row fp16 scales fixed before the sweep.

The algorithm is the reference one (IST-DASLab/gptq, as in the Parameter Golf records): dead columns zeroed,
percent damping, act-order, the upper Cholesky factor of H⁻¹, 128-column blocks with in-block error feedback
and a lazy batch update of the remaining columns. Differences: the factorisations run in fp64 (the sweep in
fp32); the in-block feedback is regrouped into 16-column steps; several settings of one matrix (the budget's
candidates) share one sweep, which also gives each row's Hessian-weighted error; and a failed Cholesky is never
hidden: the damping escalates ×10 a few times, then H is shifted by its most negative eigenvalue; the damping
finally used is recorded in GPTQStats. A non-finite H raises DataError.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from golfquant.errors import DataError
from golfquant.quant.clip import hessian_weighted_error
from golfquant.quant.qtensor import QuantizedTensor, SalientColumns
from golfquant.quant.salient import column_quantizers, round_mixed, split

__all__ = ["GPTQStats", "PreparedHessian", "Rounding", "gptq_quantize", "gptq_quantize_many", "hessian_weighted_error",
           "inverse_cholesky", "prepare_hessian"]

log = logging.getLogger(__name__)
ESCALATIONS = 3  # damp, 10·damp, 100·damp, 1000·damp, then the eigenvalue shift
_FIRST_ESCALATED_DAMP = 0.01  # when the caller asked for damp = 0
_SUB_BLOCK = 16  # columns per in-block product (benchmarks/gptq_speed.py)
_BATCH_ELEMENTS = 1 << 23  # weights per shared sweep: bounds its fp32 buffers at 32 MiB each


@dataclass
class GPTQStats:
    damp_used: float  # final damping as a fraction of mean(diag H); the largest over the slices of a bank
    escalations: int  # damping retries (eigenvalue shift included), summed over slices
    hessian_error: float | None  # tr((W - Ŵ) H (W - Ŵ)ᵀ) of the GPTQ result, with the H given: Σ row_errors
    rtn_error: float | None  # the same for round-to-nearest at the same scales
    seconds: float
    row_errors: torch.Tensor | None = None  # diag((W - Ŵ) H (W - Ŵ)ᵀ) [rows] ([S, rows] for a bank), from the sweep


def diag_mean(h: torch.Tensor) -> float:
    """mean |diag H|, the unit of the damping (abs: a broken H may have negative diagonal entries)."""
    return float(torch.diagonal(h).abs().mean()) or 1.0


def inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + δ·mean(diag H)·I)⁻¹ in fp64, with δ escalated until both factorisations
    succeed. Returns (factor, δ used, number of escalations)."""
    h = h.double()
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    mean = diag_mean(h)
    delta, escalations = damp, 0
    for attempt in range(ESCALATIONS + 1):
        factor = _try_inverse_cholesky(h + delta * mean * eye)
        if factor is not None:
            return factor, delta, escalations
        if attempt < ESCALATIONS:
            delta, escalations = (delta * 10 if delta > 0 else _FIRST_ESCALATED_DAMP), escalations + 1
    # H is far from positive definite: shift it past its most negative eigenvalue.
    lam_min = float(torch.linalg.eigvalsh(h)[0])
    delta = (max(0.0, -lam_min) + delta * mean) / mean
    factor = _try_inverse_cholesky(h + delta * mean * eye)
    if factor is None:
        raise DataError(f"Hessian is not factorisable even with damping {delta:.3g}·mean(diag); "
                        "recollect it with more calibration tokens")
    return factor, delta, escalations + 1


def _try_inverse_cholesky(h: torch.Tensor) -> torch.Tensor | None:
    chol, info = torch.linalg.cholesky_ex(h)
    if info != 0:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    return upper if info == 0 and bool(torch.isfinite(upper).all()) else None


@dataclass
class PreparedHessian:
    """What every GPTQ sweep against one Hessian shares: the dead columns, the act-order permutation and the upper
    Cholesky factor of the damped, permuted H⁻¹ (fp32). Prepare once, then quantize many candidates against it."""

    dead: torch.Tensor
    perm: torch.Tensor
    hinv: torch.Tensor
    damp_used: float
    escalations: int
    shift: float  # what the damping added to H's diagonal: damp_used·mean|diag H| (dead columns at 1)


def prepare_hessian(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = True) -> list[PreparedHessian]:
    """One PreparedHessian per slice: H [cols, cols] gives one, a bank's [S, cols, cols] gives S."""
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if not bool(torch.isfinite(hessian).all()):
        raise DataError("Hessian has NaN/Inf entries: the calibration forward pass overflowed; "
                        "recollect it (fp32 activations, fewer or shorter sequences)")
    out = []
    for h in (hessian if hessian.dim() == 3 else hessian[None]):
        h = h.double().clone()
        dead = torch.diagonal(h) == 0
        h[dead, dead] = 1.0
        cols = h.shape[0]
        perm = (torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order
                else torch.arange(cols, device=h.device))
        factor, damp_used, escalations = inverse_cholesky(h[perm][:, perm], damp)
        if escalations:
            log.warning("GPTQ: Cholesky failed at damp %g; used %.3g·mean(diag H) after %d escalation(s)",
                        damp, damp_used, escalations)
        out.append(PreparedHessian(dead, perm, factor.float(), damp_used, escalations, damp_used * diag_mean(h)))
    return out


class Rounding(NamedTuple):
    """How a GPTQ sweep rounds a matrix: its width, fp16 row scales [rows] (or [S, rows]) and optional
    salient columns (golfquant.quant.salient.salient_template)."""

    bits: int
    scales: torch.Tensor
    salient: SalientColumns | None = None


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, scales: torch.Tensor, block_size: int = 128,
                  act_order: bool = True, damp: float = 0.01, prepared: list[PreparedHessian] | None = None,
                  errors: bool = True, salient: SalientColumns | None = None) -> tuple[QuantizedTensor, GPTQStats]:
    """GPTQ of w [rows, cols] (or a bank [S, rows, cols]) given H [cols, cols] (or [S, cols, cols]) and fp16 row
    scales [rows] (or [S, rows]). `prepared`: prepare_hessian(hessian, damp, act_order), when the caller quantizes
    several candidates against one H. errors=False skips the Hessian-weighted errors of GPTQ and RTN in the
    stats (None). `salient` (golfquant.quant.salient.salient_template): columns rounded at their own row scales
    and width in the same sweep. Deterministic for a given torch build and thread count."""
    return gptq_quantize_many(w, hessian, [Rounding(bits, scales, salient)], block_size, act_order, damp, prepared,
                              errors)[0]


def gptq_quantize_many(w: torch.Tensor, hessian: torch.Tensor, settings: list[Rounding], block_size: int = 128,
                       act_order: bool = True, damp: float = 0.01, prepared: list[PreparedHessian] | None = None,
                       errors: bool = True) -> list[tuple[QuantizedTensor, GPTQStats]]:
    """gptq_quantize of one w at several settings in shared sweeps: each setting's copy of the rows goes through
    the same operations as alone (the codes are those of separate calls), while the per-column steps run once
    for up to _BATCH_ELEMENTS weights."""
    start = time.perf_counter()
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if w.dim() not in (2, 3):
        raise ValueError(f"gptq_quantize expects a 2-D or 3-D weight, got shape {tuple(w.shape)}")
    slices = w.shape[0] if w.dim() == 3 else 1
    cols = w.shape[-1]
    for st in settings:
        if tuple(hessian.shape[-2:]) != (cols, cols) or tuple(st.scales.shape) != tuple(w.shape[:-1]):
            raise ValueError(f"weight {tuple(w.shape)} needs H [{cols}, {cols}] and scales {list(w.shape[:-1])}, "
                             f"got {tuple(hessian.shape)} and {tuple(st.scales.shape)}")
    prepared = prepared or prepare_hessian(hessian, damp, act_order)
    if len(prepared) == 1 and slices > 1:
        prepared = prepared * slices
    ws = w if w.dim() == 3 else w[None]
    per_slice = [[None if st.salient is None else dataclasses.replace(st.salient, scales=st.salient.scales[i])
                  for i in range(slices)] if w.dim() == 3 else [st.salient] for st in settings]
    chunk = max(1, _BATCH_ELEMENTS // ws[0].numel())
    codes = [[] for _ in settings]  # per setting, per slice
    row_sq = [[] for _ in settings]
    for i, (wi, p) in enumerate(zip(ws, prepared)):
        for c0 in range(0, len(settings), chunk):
            part = range(c0, min(c0 + chunk, len(settings)))
            quantizers = [column_quantizers(settings[k].scales if w.dim() == 2 else settings[k].scales[i],
                                            settings[k].bits, cols, per_slice[k][i]) for k in part]
            for k, c, sq in zip(part, *_gptq_2d(wi, p, quantizers, block_size)):
                codes[k].append(c)
                row_sq[k].append(sq)
    sweep = (time.perf_counter() - start) / len(settings)
    out = []
    for st, cs, sqs in zip(settings, codes, row_sq):
        start = time.perf_counter()
        qt = split(torch.stack(cs) if w.dim() == 3 else cs[0], st.scales, st.bits, st.salient)
        # Σ err² = Δ H' Δᵀ per row; less the damping's share, Δ H Δᵀ (dead columns count in neither)
        delta = (w.float() - qt.dequantize()).double() ** 2
        live = torch.stack([d[..., ~p.dead].sum(dim=-1) * p.shift
                            for d, p in zip(delta if w.dim() == 3 else delta[None], prepared)])
        row_errors = (torch.stack(sqs) - live).float()
        hessian_error = rtn_error = None
        if errors:
            hessian_error = float(row_errors.sum(dtype=torch.float64))
            rtn_error = hessian_weighted_error(w, round_mixed(w, st.scales, st.bits, st.salient).dequantize(),
                                               hessian.float())
        out.append((qt, GPTQStats(max(p.damp_used for p in prepared), sum(p.escalations for p in prepared),
                                  hessian_error, rtn_error, sweep + time.perf_counter() - start,
                                  row_errors if w.dim() == 3 else row_errors[0])))
    return out


def _gptq_2d(w: torch.Tensor, prep: PreparedHessian, quantizers: list[tuple[torch.Tensor, list[int]]],
             block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [K, rows, cols] of one matrix w [rows, cols] at K settings, and each row's Σ_j err_j² [K, rows];
    with setting k, column c is rounded at the row scales quantizers[k][0][c] and clamped to ±quantizers[k][1][c]
    (salient.column_quantizers). The K copies of w are held transposed and side by side, [cols, K·rows], so that
    a column is one contiguous vector: the per-column steps are elementwise, and every matrix product is taken
    per copy (_per_copy), so each copy's codes are those it gets alone.

    The sweep's total error is W - Ŵ = Err·U (U the factor of H'⁻¹, H' the damped H), so Σ_j err_j² of a row is
    its (W - Ŵ) H' (W - Ŵ)ᵀ: gptq_quantize_many takes the row errors from it without a product with H."""
    rows, cols = w.shape
    w = w.float().clone()
    w[:, prep.dead] = 0.0
    perm = prep.perm.to(w.device)
    wt = w[:, perm].T.repeat(1, len(quantizers)).contiguous()  # [cols, K·rows]
    scales = torch.cat([s.to(w.device)[perm] for s, _ in quantizers], dim=1)  # [cols, K·rows]
    hi = torch.cat([torch.tensor(b, dtype=torch.float32, device=w.device)[perm, None].expand(cols, rows)
                    for _, b in quantizers], dim=1)
    lo = -hi
    hinv = prep.hinv
    q = torch.empty_like(wt)
    sq = torch.zeros(wt.shape[1], dtype=torch.float64, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = wt[i1:i2]  # a view: updated in place
        err1 = torch.empty_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        # Within the block, each column's error reaches the next columns of its sub-block at once and the rest
        # of the block by one product per sub-block: the reference arithmetic, regrouped.
        for j1 in range(0, i2 - i1, _SUB_BLOCK):
            j2 = min(j1 + _SUB_BLOCK, i2 - i1)
            for j in range(j1, j2):
                col, s = w1[j], scales[i1 + j]
                qj = torch.round(col / s).clamp_(lo[i1 + j], hi[i1 + j])  # round_codes, per-row bounds
                q[i1 + j] = qj
                err = torch.div(col - qj * s, h1[j, j], out=err1[j])
                w1[j + 1:j2].addr_(h1[j, j + 1:j2], err, alpha=-1)
            _per_copy(w1[j2:], h1[j1:j2, j2:], err1[j1:j2], rows)
        _per_copy(wt[i2:], hinv[i1:i2, i2:], err1, rows)
        sq += (err1.double() ** 2).sum(dim=0)
    codes = q[torch.argsort(perm)].T.to(torch.int8).contiguous()  # [K·rows, cols]
    return codes.reshape(len(quantizers), rows, cols), sq.reshape(-1, rows)


def _per_copy(target: torch.Tensor, h: torch.Tensor, err: torch.Tensor, rows: int) -> None:
    """target -= hᵀ @ err, one copy's columns at a time: the product's shapes, hence its rounding, are those of
    one setting alone."""
    for r in range(0, target.shape[1], rows):
        target[:, r:r + rows] -= h.T @ err[:, r:r + rows]
