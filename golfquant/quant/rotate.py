"""Incoherence rotation (`--rotate hadamard[:BLOCK]`): quantize W·R instead of W, R = D·blockdiag(H_B/√B).

D holds ±1 signs drawn from a seed, H_B is the Sylvester Walsh–Hadamard matrix: R is orthonormal, so it spreads an
outlier column over B columns (flatter rows, smaller scales) without changing any Hessian-weighted error, provided
the Hessian is rotated too (Rᵀ·H·R: GPTQ, Hessian-aware clips and LQER all run in the rotated basis). The
inverse, Ŵ = dequant·Rᵀ, is kernels.unrotate, the one definition every decoding path shares; this module only
rotates forward.
"""
from __future__ import annotations

import torch

from golfquant.errors import OptionError
from kernels.dequant import Rotation, fwht, hadamard_signs

SEED = 0  # one sign pattern for every tensor: a constant seed costs the compressed manifest nothing
KINDS = ("none", "hadamard", "auto")


def rotate(w: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """w·R on the last dim, fp32: the signs, then the Hadamard blocks (R = D·blockdiag(H_B/√B))."""
    block, seed = rotation
    return fwht(w.float() * hadamard_signs(seed, w.shape[-1], w.device), block)


def rotate_hessian(h: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Rᵀ·H·R of H [..., cols, cols]: the Hessian of the inputs seen by the rotated weight."""
    return rotate(rotate(h, rotation).mT, rotation).mT.contiguous()


def parse_rotate(text: str) -> tuple[str, int | None]:
    """`none` | `hadamard` | `hadamard:BLOCK` | `auto` -> (kind, BLOCK or None: the default block per tensor)."""
    kind, sep, block = str(text).strip().lower().partition(":")
    if kind not in KINDS or (sep and kind != "hadamard"):
        raise OptionError(f"--rotate {text!r}: use none, hadamard, hadamard:BLOCK or auto (with --budget)")
    if not sep:
        return kind, None
    if not block.isdigit() or int(block) < 2 or int(block) & (int(block) - 1):
        raise OptionError(f"--rotate {text!r}: BLOCK must be a power of two >= 2 (e.g. hadamard:64)")
    return kind, int(block)


def rotation_for(text: str, name: str, cols: int) -> Rotation | None:
    """The rotation `--rotate text` gives a quantized tensor of `cols` columns (`auto`: the one its rotated
    candidates use). The default block is the largest power of two dividing cols; an odd cols has none."""
    kind, block = parse_rotate(text)
    if kind == "none":
        return None
    if block is None:
        block = cols & -cols
        return Rotation(block, SEED) if block >= 2 else None
    if cols % block:
        raise OptionError(f"--rotate hadamard:{block} does not divide the {cols} columns of '{name}': "
                          "pick a block dividing every quantized tensor's columns, or plain --rotate hadamard")
    return Rotation(block, SEED)
