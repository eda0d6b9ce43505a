"""Cholesky GPTQ (Frantar et al. 2023) at per-row fp16 scales fixed before the sweep.

The algorithm is the reference one (IST-DASLab/gptq, as in the Parameter Golf records): dead columns zeroed,
percent damping, act-order, the upper Cholesky factor of H⁻¹, 128-column blocks with in-block error feedback
and a lazy batch update of the remaining columns. Differences: the factorisations run in fp64 (the sweep in
fp32), and a failed Cholesky is never hidden: the damping escalates ×10 a few times, then H is shifted by its
most negative eigenvalue; the damping finally used is recorded in GPTQStats. A non-finite H raises DataError.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from golfquant.errors import DataError
from golfquant.quant.clip import hessian_weighted_error
from golfquant.quant.qtensor import QuantizedTensor, SalientColumns
from golfquant.quant.salient import column_quantizers, round_mixed, split

__all__ = ["GPTQStats", "PreparedHessian", "gptq_quantize", "hessian_weighted_error", "inverse_cholesky",
           "prepare_hessian"]

log = logging.getLogger(__name__)
ESCALATIONS = 3  # damp, 10·damp, 100·damp, 1000·damp, then the eigenvalue shift
_FIRST_ESCALATED_DAMP = 0.01  # when the caller asked for damp = 0


@dataclass
class GPTQStats:
    damp_used: float  # final damping as a fraction of mean(diag H); the largest over the slices of a bank
    escalations: int  # damping retries (eigenvalue shift included), summed over slices
    hessian_error: float | None  # tr((W - Ŵ) H (W - Ŵ)ᵀ) of the GPTQ result, with the H given
    rtn_error: float | None  # the same for round-to-nearest at the same scales
    seconds: float


def inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + δ·mean(diag H)·I)⁻¹ in fp64, with δ escalated until both factorisations
    succeed. Returns (factor, δ used, number of escalations)."""
    h = h.double()
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    mean = float(torch.diagonal(h).abs().mean()) or 1.0  # abs: a broken H may have negative diagonal entries
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
        out.append(PreparedHessian(dead, perm, factor.float(), damp_used, escalations))
    return out


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, scales: torch.Tensor, block_size: int = 128,
                  act_order: bool = True, damp: float = 0.01, prepared: list[PreparedHessian] | None = None,
                  errors: bool = True, salient: SalientColumns | None = None) -> tuple[QuantizedTensor, GPTQStats]:
    """GPTQ of w [rows, cols] (or a bank [S, rows, cols]) given H [cols, cols] (or [S, cols, cols]) and fp16 row
    scales [rows] (or [S, rows]). `prepared`: prepare_hessian(hessian, damp, act_order), when the caller quantizes
    several candidates against one H. errors=False skips the Hessian-weighted errors of GPTQ and RTN in the
    stats (None). `salient` (golfquant.quant.salient.salient_template): columns rounded at their own row scales
    and width in the same sweep. Deterministic for a given torch build and thread count."""
    start = time.perf_counter()
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if w.dim() not in (2, 3):
        raise ValueError(f"gptq_quantize expects a 2-D or 3-D weight, got shape {tuple(w.shape)}")
    slices = w.shape[0] if w.dim() == 3 else 1
    cols = w.shape[-1]
    if tuple(hessian.shape[-2:]) != (cols, cols) or tuple(scales.shape) != tuple(w.shape[:-1]):
        raise ValueError(f"weight {tuple(w.shape)} needs H [{cols}, {cols}] and scales {list(w.shape[:-1])}, "
                         f"got {tuple(hessian.shape)} and {tuple(scales.shape)}")
    prepared = prepared or prepare_hessian(hessian, damp, act_order)
    if len(prepared) == 1 and slices > 1:
        prepared = prepared * slices
    ws, ss = (w, scales) if w.dim() == 3 else (w[None], scales[None])
    sal = [None] * len(ws) if salient is None else [
        dataclasses.replace(salient, scales=si) for si in (salient.scales if w.dim() == 3 else salient.scales[None])]
    codes = torch.stack([_gptq_2d(wi, p, *column_quantizers(si, bits, cols, sa), block_size)
                         for wi, p, si, sa in zip(ws, prepared, ss, sal)])
    qt = split(codes if w.dim() == 3 else codes[0], scales, bits, salient)
    hessian_error = rtn_error = None
    if errors:
        h = hessian.float()
        rtn = round_mixed(w, scales, bits, salient)
        hessian_error = hessian_weighted_error(w, qt.dequantize(), h)
        rtn_error = hessian_weighted_error(w, rtn.dequantize(), h)
    stats = GPTQStats(max(p.damp_used for p in prepared), sum(p.escalations for p in prepared), hessian_error,
                      rtn_error, time.perf_counter() - start)
    return qt, stats


def _gptq_2d(w: torch.Tensor, prep: PreparedHessian, scales: torch.Tensor, bound: list[int], block_size: int
             ) -> torch.Tensor:
    """Codes of one matrix; column c is rounded at the row scales scales[c] and clamped to ±bound[c]
    (salient.column_quantizers: one width and scale vector for all columns but salient groups)."""
    rows, cols = w.shape
    w = w.float().clone()
    w[:, prep.dead] = 0.0
    w = w[:, prep.perm]
    hinv = prep.hinv
    order = prep.perm.tolist()
    q = torch.empty(rows, cols, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty(rows, i2 - i1, device=w.device)
        h1 = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col, s, r = w1[:, j], scales[order[i1 + j]], bound[order[i1 + j]]
            qj = torch.clamp(torch.round(col / s), -r, r)  # the same expression as round_codes
            q[:, i1 + j] = qj
            err = (col - qj * s) / h1[j, j]
            w1[:, j + 1:] -= torch.outer(err, h1[j, j + 1:])
            err1[:, j] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(prep.perm)].to(torch.int8)
