"""Where every byte of a submission goes: per tensor, per role group, scales and metadata, code, headroom.

Compressed bytes of shared sections (fp16 scales, passthrough floats) are attributed to tensors in proportion to
their raw bytes (golfquant.artifact.artifact_sizes); the header and manifest are their own rows, so the rows add up
to the file size exactly. Entropy bounds are computed on the decoded integer codes.
"""
from __future__ import annotations

from pathlib import Path

from golfquant.artifact import artifact_sizes, read_artifact
from golfquant.codec.entropy import EntropyBounds, bytes_bound
from golfquant.plan import DTYPES
from golfquant.quant import QuantizedTensor

CAP_BYTES = 16_000_000


def size_report(artifact_path, code_bytes: int = 0, budget: int = CAP_BYTES, entropy: bool = True) -> dict:
    info = artifact_sizes(artifact_path)
    bounds = _entropy_bounds(artifact_path) if entropy else {}
    tensors = []
    for t in info.tensors:
        raw = t.numel * t.bits // 8 if t.bits else t.numel * DTYPES[_float_dtype(t.scheme)].itemsize
        row = {
            "name": t.name, "role": t.role, "shape": list(t.shape), "scheme": t.scheme, "bits": t.bits,
            "elements": t.numel, "raw_bytes": raw, "compressed_bytes": t.total, "codes_bytes": t.codes_bytes,
            "scales_bytes": t.scales_bytes, "lqer_bytes": t.lqer_bytes, "bits_per_weight": t.bits_per_weight,
            "codec": t.codec, "layout": t.layout,
        }
        if t.name in bounds:
            b = bounds[t.name]
            order0 = b.order0
            row |= {"entropy_bytes": order0, "row_entropy_bytes": b.rows, "col_entropy_bytes": b.cols,
                    "overhead_pct": 100.0 * (t.codes_bytes / order0 - 1.0) if order0 else None}
        tensors.append(row)
    artifact_bytes = info.total_bytes
    total = artifact_bytes + code_bytes
    return {
        "artifact": str(Path(artifact_path)),
        "artifact_bytes": artifact_bytes,
        "code_bytes": code_bytes,
        "total_bytes": total,
        "budget": budget,
        "headroom_bytes": budget - total,
        "header_bytes": info.header_bytes,
        "manifest_bytes": info.manifest_bytes,
        "scales_bytes": sum(t.scales_bytes for t in info.tensors),
        "entropy_bytes": sum(b.order0 for b in bounds.values()) if entropy else None,
        "groups": _groups(tensors),
        "tensors": tensors,
    }


def _float_dtype(scheme: str) -> str:
    return {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}.get(scheme, "float32")


def _entropy_bounds(artifact_path) -> dict[str, EntropyBounds]:
    """Order-0, per-row and per-column conditional entropy of each tensor's codes, in bytes."""
    return {name: bytes_bound(value.codes.numpy()) for name, value in read_artifact(artifact_path).tensors.items()
            if isinstance(value, QuantizedTensor)}


def _groups(tensors: list[dict]) -> list[dict]:
    groups: dict[str, dict] = {}
    for t in tensors:
        g = groups.setdefault(t["role"], {"role": t["role"], "tensors": 0, "elements": 0, "raw_bytes": 0,
                                          "compressed_bytes": 0, "entropy_bytes": 0.0})
        g["tensors"] += 1
        g["elements"] += t["elements"]
        g["raw_bytes"] += t["raw_bytes"]
        g["compressed_bytes"] += t["compressed_bytes"]
        g["entropy_bytes"] += t.get("entropy_bytes") or 0.0
    for g in groups.values():
        g["bits_per_weight"] = 8.0 * g["compressed_bytes"] / g["elements"] if g["elements"] else 0.0
    return sorted(groups.values(), key=lambda g: -g["compressed_bytes"])
