"""Round-to-nearest symmetric per-row intN quantization.

Scales come from golfquant.quant.clip (the one place clip specs are parsed and computed): clip / qmax in fp32,
rounded to fp16 first; the codes are then rounded at those fp16 scales, so they match the stored scales exactly.
"""
from __future__ import annotations

import torch

from golfquant.errors import CheckpointError
from golfquant.quant.clip import ClipSpec, parse_clip, row_scales
from golfquant.quant.qtensor import QuantizedTensor, SalientColumns
from golfquant.quant.salient import main_part, round_mixed


def quantize_rtn(w: torch.Tensor, bits: int, clip: str | ClipSpec = "amax", role: str | None = None,
                 hessian: torch.Tensor | None = None, salient: SalientColumns | None = None) -> QuantizedTensor:
    """RTN of a matrix [R, C] (scales [R]) or a parameter bank [S, R, C] (scales [S, R]).

    clip: a clip spec (`amax`, `pct:99.99984`, `sdclip:12.85`, ...); role picks the per-role k of sdclip specs;
    hessian: for the clips that read it (hsdclip); salient (golfquant.quant.salient.salient_template): columns
    rounded at their own scales and width, the clip computed on the other columns.
    """
    spec = parse_clip(clip) if isinstance(clip, str) else clip
    w32 = w.detach().to(torch.float32)
    if not bool(torch.isfinite(w32).all()):
        raise CheckpointError(f"cannot quantize a tensor of shape {tuple(w.shape)} holding NaN or inf: "
                              "fix the checkpoint")
    main, main_h = main_part(w32, hessian, salient)
    scales = row_scales(main, bits, spec, main_h, role)
    return round_mixed(w32, scales, bits, salient)
