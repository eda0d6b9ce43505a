"""One matrix at one setting (width, clip, optional LQER, salient column groups and rotation): GPTQ when asked and
a Hessian exists, else RTN.

The one place the pipeline, the measurement and the budget search turn a float weight into codes, so that what
the measurement priced is what the artifact holds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

from golfquant.quant import gptq
from golfquant.quant.clip import ClipSpec, row_scales
from golfquant.quant.gptq import GPTQStats, PreparedHessian, prepare_hessian
from golfquant.quant.lqer import LqerOptions, apply_lqer
from golfquant.quant.qtensor import QuantizedTensor, Rotation
from golfquant.quant.rotate import rotate, rotate_hessian
from golfquant.quant.rtn import quantize_rtn
from golfquant.quant.salient import SalientOptions, main_part, salient_template

METHODS = ("gptq", "rtn")
# Clip methods that read the tensor's Hessian; tensors without one fall back to plain k·std clipping.
HESSIAN_CLIPS = ("hsdclip",)


class Setting(NamedTuple):
    """One way to store a matrix: its width, clip, and optional LQER correction and salient column groups."""

    bits: int
    clip: ClipSpec
    lqer: LqerOptions | None = None
    salient: SalientOptions | None = None


@dataclass(frozen=True)
class Quantizer:
    """How codes are made: `gptq` (Cholesky GPTQ at the clip's fixed row scales) or `rtn` (round to nearest), in
    fp32 on `device` (None: where the weight is); the values it returns are on the CPU, where artifacts are
    encoded."""

    method: str = "gptq"
    block_size: int = 128
    act_order: bool = True
    damp: float = 0.01
    device: torch.device | None = None

    def prepare(self, hessian: torch.Tensor | None, rotation: Rotation | None = None
                ) -> list[PreparedHessian] | None:
        """The GPTQ factorisation of one Hessian (in the `rotation`'s basis), to share across the candidates
        quantized against it."""
        if self.method != "gptq" or hessian is None:
            return None
        hessian = hessian.to(self.device or hessian.device)
        return prepare_hessian(hessian if rotation is None else rotate_hessian(hessian, rotation), self.damp,
                               self.act_order)

    def __call__(self, w: torch.Tensor, bits: int, clip: ClipSpec, role: str | None, hessian: torch.Tensor | None,
                 lqer: LqerOptions | None = None, prepared: list[PreparedHessian] | None = None,
                 errors: bool = True, salient: SalientOptions | None = None, rotation: Rotation | None = None
                 ) -> tuple[QuantizedTensor, GPTQStats | None]:
        """Codes of w at `bits` with `clip`; GPTQ's statistics when it ran (errors=False: without the
        Hessian-weighted errors). With `lqer` (rank > 0) the result carries a low-rank correction of its error,
        fitted with the activation scaling of the Hessian. With `salient` (top > 0) its most salient column groups
        are stored at salient.bits in the same solve (OptionError when w cannot have them, e.g. without a
        Hessian). With `rotation` everything (saliency and the salient split, scales, GPTQ, LQER, the stats)
        happens to W·R against Rᵀ·H·R, and the result records the rotation its dequantization undoes; `prepared`
        must then be of the rotated Hessian (prepare(hessian, rotation))."""
        return self.many(w, [Setting(bits, clip, lqer, salient)], role, hessian, prepared, errors, rotation)[0]

    def many(self, w: torch.Tensor, settings: list[Setting], role: str | None, hessian: torch.Tensor | None,
             prepared: list[PreparedHessian] | None = None, errors: bool = True, rotation: Rotation | None = None
             ) -> list[tuple[QuantizedTensor, GPTQStats | None]]:
        """`self(...)` of w at each setting, the same values, with GPTQ's sweeps shared (gptq_quantize_many)."""
        device = self.device or w.device
        w = w.to(device).float()
        hessian = None if hessian is None else hessian.to(device)
        if rotation is not None:
            w = rotate(w, rotation)
            hessian = None if hessian is None else rotate_hessian(hessian, rotation)
        bases = list(dict.fromkeys(st._replace(lqer=None) for st in settings))  # LQER corrects a shared rounding
        resolved = []  # (bits, clip, salient columns) of each base as the quantizer sees them
        for st in bases:
            clip = st.clip
            if clip.method in HESSIAN_CLIPS and hessian is None:
                clip = dataclasses.replace(clip, method="sdclip", lam=0.0)
            sal = salient_template(w, hessian, st.bits, st.salient) if st.salient is not None and st.salient.top > 0 \
                else None
            resolved.append((st.bits, clip, sal))
        if self.method == "gptq" and hessian is not None:
            rounds = []
            for bits, clip, sal in resolved:
                main, main_h = main_part(w, hessian, sal)
                rounds.append(gptq.Rounding(bits, row_scales(main, bits, clip, main_h, role), sal))
            out = gptq.gptq_quantize_many(w, hessian, rounds, self.block_size, self.act_order, self.damp, prepared,
                                          errors)
        else:
            out = [(quantize_rtn(w, bits, clip, role, hessian, sal), None) for bits, clip, sal in resolved]
        rounded = dict(zip(bases, out))
        results = []
        for st in settings:
            qt, stats = rounded[st._replace(lqer=None)]
            if st.lqer is not None and st.lqer.rank > 0:
                qt = apply_lqer(qt, w, st.lqer.rank, st.lqer.a_bits, st.lqer.b_bits, st.lqer.group, hessian)
                stats = stats and dataclasses.replace(stats, row_errors=None)  # of the codes, not the correction
            results.append((dataclasses.replace(qt, rotation=rotation).to("cpu"), stats))
        return results
