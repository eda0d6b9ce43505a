"""Salient input-column groups at a higher width inside one GPTQ solve (AWQ-lite, as the challenge's PR #1908).

Saliency of input column j is its activation RMS times its mean weight magnitude, s_j = sqrt(H_jj)·mean_i |W_ij|
(H = Σ x xᵀ, so sqrt(H_jj) ∝ the RMS of x_j); a group of `group` consecutive columns scores the sum of its columns,
and the `top` groups with the largest score (ties: the lower index) keep codes of width `bits` with row scales of
their own (max |w| of the row over those columns / qmax: no clipping, these columns are where the outliers are).
The other columns get the usual clip, computed on them alone. A weight-only proxy fails (PR #1602), so salient
groups need the tensor's Hessian. A bank [S, rows, cols] uses the same groups in every slice, scored over all of
them (one column list per tensor keeps the artifact and the kernels' column scatter simple).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from golfquant.errors import OptionError
from golfquant.quant.clip import ClipSpec, round_codes, row_scales
from golfquant.quant.qtensor import MAX_BITS, MIN_BITS, QuantizedTensor, SalientColumns, qmax, salient_columns


@dataclass(frozen=True)
class SalientOptions:
    """The `top` most salient groups of `group` input columns at `bits` (PR #1908: top=1, group=64, int8); top=0
    is off. `auto` (with --budget): not applied to every matrix but offered to the allocation as candidates on
    int4, int5 and the records' int6, bought per tensor where their measured damage pays for their bytes."""

    top: int = 0
    group: int = 64
    bits: int = 8
    auto: bool = False

    def __post_init__(self) -> None:
        if self.top < 0 or self.group < 1 or not MIN_BITS <= self.bits <= MAX_BITS:
            raise OptionError(f"salient groups need top >= 0, group >= 1 and bits in {MIN_BITS}..{MAX_BITS}, "
                              f"got top={self.top}, group={self.group}, bits={self.bits}")

    def unfit(self, shape: tuple[int, ...], bits: int, hessian: torch.Tensor | None) -> str | None:
        """Why a tensor of `shape` at width `bits` cannot have these salient groups (None: it can)."""
        if hessian is None:
            return "salient groups are chosen by activation RMS and need the tensor's Hessian: calibrate (gptq)"
        if len(shape) not in (2, 3) or shape[-1] % self.group:
            return f"{shape[-1] if shape else 0} input columns are not a multiple of the salient group {self.group}"
        if self.top >= shape[-1] // self.group:
            return f"top={self.top} salient groups leave none of the {shape[-1] // self.group} groups at int{bits}"
        if self.bits <= bits:
            return f"salient groups at int{self.bits} are not wider than the tensor's int{bits}"
        return None


def group_saliency(w: torch.Tensor, hessian: torch.Tensor, group: int) -> torch.Tensor:
    """Σ over each group's columns (and a bank's slices) of sqrt(diag H)·mean |W| over rows, in fp64."""
    act = torch.diagonal(hessian.double(), dim1=-2, dim2=-1).clamp_min(0).sqrt()
    col = act * w.double().abs().mean(dim=-2)
    return col.reshape(-1, col.shape[-1]).sum(0).reshape(-1, group).sum(-1)


def select_groups(w: torch.Tensor, hessian: torch.Tensor, group: int, top: int) -> tuple[int, ...]:
    """The `top` most salient group indices, ascending; ties go to the lower index."""
    score = group_saliency(w, hessian, group).tolist()
    return tuple(sorted(sorted(range(len(score)), key=lambda g: (-score[g], g))[:top]))


def salient_template(w: torch.Tensor, hessian: torch.Tensor | None, bits: int, opts: SalientOptions
                     ) -> SalientColumns:
    """Where and how w's salient groups are stored: groups, width and their row scales (codes all 0 for now: the
    quantizer fills them). OptionError when w cannot have them."""
    reason = opts.unfit(tuple(w.shape), bits, hessian)
    if reason is not None:
        raise OptionError(reason)
    groups = select_groups(w, hessian, opts.group, opts.top)
    sub = w[..., salient_columns(groups, opts.group).to(w.device)]
    scales = row_scales(sub, opts.bits, ClipSpec("amax"))
    return SalientColumns(groups, opts.group, torch.zeros(sub.shape, dtype=torch.int8, device=w.device), scales,
                          opts.bits)


def main_part(w: torch.Tensor, hessian: torch.Tensor | None, salient: SalientColumns | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w and H without the salient columns: what the main row scales (clip) are computed on."""
    if salient is None:
        return w, hessian
    keep = torch.ones(w.shape[-1], dtype=torch.bool, device=w.device)
    keep[salient.columns()] = False
    return w[..., keep], None if hessian is None else hessian[..., keep, :][..., keep]


def column_quantizers(scales: torch.Tensor, bits: int, cols: int, salient: SalientColumns | None
                      ) -> tuple[torch.Tensor, list[int]]:
    """Each column's fp32 row scales [cols, rows] and code bound, for one 2-D matrix: the main ones, and in the
    salient columns the salient ones (`salient.scales` of this matrix). A view without salient groups."""
    s = scales.float().expand(cols, -1)
    r = [qmax(bits)] * cols
    if salient is not None:
        idx = salient.columns()
        s = s.clone()
        s[idx] = salient.scales.float()
        for c in idx.tolist():
            r[c] = qmax(salient.bits)
    return s, r


def split(codes: torch.Tensor, scales: torch.Tensor, bits: int, salient: SalientColumns | None) -> QuantizedTensor:
    """The QuantizedTensor of codes [..., rows, cols] whose salient columns hold the salient codes: those move to
    salient.codes, the main codes keep 0 there."""
    if salient is None:
        return QuantizedTensor(codes, scales, bits)
    idx = salient.columns()
    sal = SalientColumns(salient.groups, salient.group, codes[..., idx].contiguous(), salient.scales, salient.bits)
    return QuantizedTensor(codes.index_fill(-1, idx, 0), scales, bits, salient=sal)


def round_mixed(w: torch.Tensor, scales: torch.Tensor, bits: int, salient: SalientColumns | None
                ) -> QuantizedTensor:
    """RTN of w: the main columns at `scales`, the salient ones at their own scales and width."""
    codes = round_codes(w, scales, bits)
    if salient is None:
        return QuantizedTensor(codes, scales, bits)
    idx = salient.columns()
    sal = round_codes(w[..., idx], salient.scales, salient.bits)
    return split(codes.index_copy(-1, idx, sal), scales, bits, salient)
