"""Round-to-nearest symmetric per-row intN quantization.

Scales come from golfquant.quant.clip (the one place clip specs are parsed and computed): clip / qmax in fp32,
rounded to fp16 first; the codes are then rounded at those fp16 scales, so they match the stored scales exactly.
"""
from __future__ import annotations

import torch

from golfquant.errors import CheckpointError
from golfquant.quant.clip import ClipSpec, parse_clip, round_codes, row_scales
from golfquant.quant.qtensor import QuantizedTensor


def quantize_rtn(w: torch.Tensor, bits: int, clip: str | ClipSpec = "amax", role: str | None = None,
                 hessian: torch.Tensor | None = None) -> QuantizedTensor:
    """RTN of a matrix [R, C] (scales [R]) or a parameter bank [S, R, C] (scales [S, R]).

    clip: a clip spec (`amax`, `pct:99.99984`, `sdclip:12.85`, ...); role picks the per-role k of sdclip specs;
    hessian: for the clips that read it (hsdclip).
    """
    spec = parse_clip(clip) if isinstance(clip, str) else clip
    w32 = w.detach().to(torch.float32)
    if not bool(torch.isfinite(w32).all()):
        raise CheckpointError(f"cannot quantize a tensor of shape {tuple(w.shape)} holding NaN or inf: "
                              "fix the checkpoint")
    scales = row_scales(w32, bits, spec, hessian, role)
    return QuantizedTensor(round_codes(w32, scales, bits), scales, bits)
