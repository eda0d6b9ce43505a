"""Rate-distortion allocation: per tensor a width (int2..int8) and an SDClip k, least total error under a byte budget.

Error proxy. For a linear layer y = W x, quantization adds E x to its output; with the calibration Hessian
H = E[x xᵀ] (golfquant.calib: XᵀX / tokens) the mean squared output perturbation is tr(E H Eᵀ). A second-order
expansion of the loss around the float model, with the loss curvature with respect to every layer output taken
as the same multiple of the identity and cross-layer terms dropped, makes the loss increase proportional to the
sum over tensors of tr(E H Eᵀ): the quantity GPTQ minimizes per layer, and the one the records' trace(H)
ranking approximates (brief §2.8). It ignores how much the network amplifies each layer's perturbation, so it
is a proxy, not the bpb; what it gets right is the scale of each layer's inputs, which is what the records'
sensitivity ranking measured. A tensor without a Hessian is weighted as H = h̄·I with h̄ the median mean(diag H)
over the tensors that have one (the caller passes `h_default`): its error counts like that of a typical layer.

Rate: bytes of the codes per candidate from the caller's size function (an entropy estimate; the pipeline then
corrects it per tensor with real compressed sizes and re-allocates). Allocation: each tensor's candidates are
reduced to the lower convex hull of (bytes, error); starting from every tensor's smallest candidate, hull steps
are taken greedily by error removed per byte (the Lagrangian solution at every multiplier), skipping a step
that no longer fits and continuing with smaller ones, so the leftover bytes are used.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from golfquant.quant.clip import ClipSpec, RECORD_K, hessian_weighted_error, round_codes, row_scales
from golfquant.quant.qtensor import MAX_BITS, MIN_BITS, QuantizedTensor

WIDTHS = tuple(range(MIN_BITS, MAX_BITS + 1))
# SDClip k around the records' int6 k = 12.85, scaled with the width ((b, k) ~ (b+1, 2k): the same step size).
K_STEPS = (-2, -1, 0, 1, 2)  # k = 12.85 · 2^(b-6) · 2^(j/2)


@dataclass(frozen=True)
class Candidate:
    bits: int
    clip: ClipSpec
    bytes: float
    error: float

    @property
    def label(self) -> str:
        return f"int{self.bits} {self.clip}"


def sdclip_candidates(widths: Sequence[int] = WIDTHS, steps: Sequence[int] = K_STEPS) -> list[tuple[int, ClipSpec]]:
    """(bits, SDClip spec) pairs: per width the records' k scaled to that width, times 2^(j/2)."""
    out = []
    for b in widths:
        for j in steps:
            k = round(RECORD_K["default"] * 2.0 ** (b - 6) * 2.0 ** (j / 2), 4)
            out.append((b, ClipSpec("sdclip", k=(("default", k),))))
    return out


def measure_candidates(w: torch.Tensor, hessian: torch.Tensor | None, h_default: float, role: str,
                       options: Sequence[tuple[int, ClipSpec]], size: Callable[[torch.Tensor, int], float]
                       ) -> list[Candidate]:
    """RTN codes of w for every (bits, clip): bytes from `size(codes, bits)`, error tr(E H Eᵀ) (h_default·‖E‖²
    without a Hessian)."""
    w = w.float()
    out = []
    for bits, clip in options:
        scales = row_scales(w, bits, clip, hessian, role)
        qt = QuantizedTensor(round_codes(w, scales, bits), scales, bits)
        err = hessian_weighted_error(w, qt.dequantize(), hessian)
        out.append(Candidate(bits, clip, size(qt.codes, bits), err if hessian is not None else h_default * err))
    return out


def _hull(cands: Sequence[Candidate]) -> list[int]:
    """Indices of the lower convex hull of (bytes, error), by increasing bytes and decreasing error."""
    pts = sorted(range(len(cands)), key=lambda i: (cands[i].bytes, cands[i].error, i))
    hull: list[int] = []
    for i in pts:
        if hull and cands[i].error >= cands[hull[-1]].error:
            continue  # not smaller error for more bytes
        while len(hull) >= 2:
            a, b = cands[hull[-2]], cands[hull[-1]]
            c = cands[i]
            # drop b if it lies on or above the segment a-c
            if (b.error - a.error) * (c.bytes - a.bytes) >= (c.error - a.error) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def smallest_bytes(candidates: Mapping[str, Sequence[Candidate]],
                   scale: Mapping[str, float] | None = None) -> float:
    return sum(min(c.bytes for c in cs) * (scale or {}).get(n, 1.0) for n, cs in candidates.items())


def allocate(candidates: Mapping[str, Sequence[Candidate]], budget: float,
             scale: Mapping[str, float] | None = None) -> dict[str, int] | None:
    """{name: index of the chosen candidate} with sum of bytes·scale[name] <= budget and least total error
    (greedy on the convex hulls); None when even the smallest candidates exceed the budget."""
    scale = dict(scale or {})
    hulls = {n: _hull(cs) for n, cs in candidates.items()}
    pos = {n: 0 for n in candidates}
    total = sum(candidates[n][h[0]].bytes * scale.get(n, 1.0) for n, h in hulls.items())
    if total > budget:
        return None
    names = list(candidates)
    heap: list[tuple[float, int]] = []

    def push(t: int) -> None:
        n = names[t]
        h, p = hulls[n], pos[n]
        if p + 1 < len(h):
            a, b = candidates[n][h[p]], candidates[n][h[p + 1]]
            heapq.heappush(heap, ((b.error - a.error) / ((b.bytes - a.bytes) * scale.get(n, 1.0)), t))

    for t in range(len(names)):
        push(t)
    while heap:
        _, t = heapq.heappop(heap)
        n = names[t]
        h, p = hulls[n], pos[n]
        step = (candidates[n][h[p + 1]].bytes - candidates[n][h[p]].bytes) * scale.get(n, 1.0)
        if total + step > budget:
            continue  # this tensor's later steps are less efficient and larger: it stops here
        total += step
        pos[n] = p + 1
        push(t)
    return {n: hulls[n][pos[n]] for n in names}
