"""Bit layouts for integer codes (docs/architecture.md "Bit layouts", restated in docs/artifact.md).

`int8` holds the signed code q per byte; `nibble` and `planes` hold the offset-binary u = q + 2**(b-1). A `.T`
suffix orders the elements by `codes.mT` (last two dims swapped) instead of `codes`. All work is vectorized numpy.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from golfquant.errors import ArtifactError
from golfquant.quant.qtensor import MAX_BITS, MIN_BITS, qmax
from kernels.dequant import (LAYOUTS as BASE_LAYOUTS,  # the kernels decode the same layouts; one definition
                             packed_nbytes, parse_layout, plane_widths)

LAYOUTS = BASE_LAYOUTS + tuple(f"{name}.T" for name in BASE_LAYOUTS)


def layouts_for(bits: int, ndim: int = 2) -> tuple[str, ...]:
    """Layouts valid for codes of width `bits` and rank `ndim` (`nibble` needs bits <= 4, `.T` needs ndim >= 2)."""
    base = [name for name in BASE_LAYOUTS if name != "nibble" or bits <= 4]
    return tuple(base) + (tuple(f"{name}.T" for name in base) if ndim >= 2 else ())


def packed_length(numel: int, bits: int, layout: str) -> int:
    """Bytes that `numel` codes of width `bits` take in `layout`."""
    return packed_nbytes(numel, parse_layout(bits, layout))


def _check_layout(bits: int, layout: str, ndim: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}': use one of {', '.join(LAYOUTS)}")
    if layout not in layouts_for(bits, ndim):
        raise ValueError(f"layout '{layout}' does not fit {bits}-bit codes of rank {ndim}")


def _element_order(arr: np.ndarray, layout: str) -> np.ndarray:
    return arr.swapaxes(-1, -2).reshape(-1) if layout.endswith(".T") else arr.reshape(-1)


def pack_codes(codes: torch.Tensor | np.ndarray, bits: int, layout: str) -> bytes:
    """Serialize int8 codes in [-qmax(bits), qmax(bits)] into `layout`."""
    arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if arr.dtype != np.int8:
        raise TypeError(f"codes must be int8, got {arr.dtype}")
    r = qmax(bits)
    _check_layout(bits, layout, arr.ndim)
    flat = _element_order(arr, layout)
    if flat.size and (int(flat.min()) < -r or int(flat.max()) > r):
        raise ValueError(f"codes outside [-{r}, {r}] for {bits} bits")
    base = layout.removesuffix(".T")
    if base == "int8":
        return flat.tobytes()
    u = (flat.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    if base == "nibble":
        return _pack_plane(u, 4)
    parts, shift = [], 0
    for w in plane_widths(bits):
        parts.append(_pack_plane((u >> shift) & ((1 << w) - 1), w))
        shift += w
    return b"".join(parts)


def _pack_plane(values: np.ndarray, width: int) -> bytes:
    """8/width values per byte, element i at bit (i mod (8/width))*width, LSB first; zero padding to a whole byte."""
    per = 8 // width
    padded = np.zeros(-(-values.size // per) * per, dtype=np.uint8)
    padded[: values.size] = values
    shifts = (np.arange(per, dtype=np.uint8) * width).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8).tobytes()


def _unpack_plane(buf: np.ndarray, width: int, numel: int) -> np.ndarray:
    per = 8 // width
    shifts = (np.arange(per, dtype=np.uint8) * width).astype(np.uint8)
    values = ((buf[:, None] >> shifts) & ((1 << width) - 1)).reshape(-1)
    if values[numel:].any():
        raise ArtifactError(f"packed codes have nonzero padding bits in a {width}-bit plane")
    return values[:numel]


def unpack_codes(data: bytes, bits: int, layout: str, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of pack_codes: an int8 tensor of `shape`. Malformed input raises ArtifactError."""
    if type(bits) is not int or not MIN_BITS <= bits <= MAX_BITS:
        raise ArtifactError(f"code width {bits!r} is not in {MIN_BITS}..{MAX_BITS}")
    shape = tuple(shape)
    if not all(type(d) is int and d >= 0 for d in shape):
        raise ArtifactError(f"bad codes shape {list(shape)}: dims must be non-negative integers")
    if layout not in layouts_for(bits, len(shape)):
        raise ArtifactError(f"layout '{layout}' is unknown or does not fit {bits}-bit codes of shape {list(shape)}")
    numel = math.prod(shape)
    expected = packed_length(numel, bits, layout)
    if len(data) != expected:
        raise ArtifactError(
            f"{bits}-bit codes of shape {list(shape)} in layout '{layout}' take {expected} bytes, got {len(data)}"
        )
    buf = np.frombuffer(data, dtype=np.uint8)
    base = layout.removesuffix(".T")
    half = 2 ** (bits - 1)
    if base == "int8":
        flat = buf.view(np.int8).copy()
    else:
        if base == "nibble":
            u = _unpack_plane(buf, 4, numel)
        else:
            u = np.zeros(numel, dtype=np.uint8)
            start, shift = 0, 0
            for w in plane_widths(bits):
                size = math.ceil(numel * w / 8)
                u |= _unpack_plane(buf[start : start + size], w, numel) << np.uint8(shift)
                start, shift = start + size, shift + w
        flat = (u.astype(np.int16) - half).astype(np.int8)
    r = qmax(bits)
    if flat.size and (int(flat.min()) < -r or int(flat.max()) > r):
        raise ArtifactError(f"{bits}-bit codes in layout '{layout}' fall outside [-{r}, {r}]")
    if layout.endswith(".T"):
        arr = flat.reshape(shape[:-2] + (shape[-1], shape[-2])).swapaxes(-1, -2)
    else:
        arr = flat.reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(arr))
