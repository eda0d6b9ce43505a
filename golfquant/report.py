"""Where every byte of a submission goes: per tensor, per role group, scales and metadata, code, headroom.

Compressed bytes of shared sections (fp16 scales, passthrough floats) are attributed to tensors in proportion to
their raw bytes (golfquant.artifact.artifact_sizes); the header and manifest are their own rows, so the rows add up
to the file size exactly. Entropy bounds are computed on the decoded integer codes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from golfquant.artifact import artifact_sizes, read_artifact
from golfquant.codec import CODES_CODECS, compress
from golfquant.codec.entropy import EntropyBounds, bytes_bound
from golfquant.codec.sizemodel import RANS, estimate_codes_section
from golfquant.plan import FLOAT_SCHEMES
from golfquant.quant import QuantizedTensor

CAP_BYTES = 16_000_000


def size_report(artifact_path, code_bytes: int = 0, budget: int = CAP_BYTES, entropy: bool = True,
                compare_codecs: bool = False) -> dict:
    """The report as a dict. compare_codecs: also the real size of every codec x layout for every codes section
    (compresses each of them: slow on a full-size artifact)."""
    info = artifact_sizes(artifact_path)
    bounds = _entropy_bounds(artifact_path) if entropy else {}
    tensors = []
    for t in info.tensors:
        raw = t.numel * t.bits // 8 if t.bits else t.numel * FLOAT_SCHEMES.get(t.scheme, torch.float32).itemsize
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
                    "overhead_pct": 100.0 * (t.codes_bytes / order0 - 1.0) if order0 else None,
                    "row_overhead_pct": 100.0 * (t.codes_bytes / b.rows - 1.0) if b.rows else None}
        tensors.append(row)
    artifact_bytes = info.total_bytes
    total = artifact_bytes + code_bytes
    entropy_total = sum(b.order0 for b in bounds.values()) if entropy else None
    codes_total = sum(t.codes_bytes for t in info.tensors if t.name in bounds)
    report = {
        "artifact": str(Path(artifact_path)),
        "artifact_bytes": artifact_bytes,
        "code_bytes": code_bytes,
        "total_bytes": total,
        "budget": budget,
        "headroom_bytes": budget - total,
        "header_bytes": info.header_bytes,
        "manifest_bytes": info.manifest_bytes,
        "scales_bytes": sum(t.scales_bytes for t in info.tensors),
        "entropy_bytes": entropy_total,
        "row_entropy_bytes": sum(b.rows for b in bounds.values()) if entropy else None,
        "codes_bytes": codes_total,
        "overhead_pct": 100.0 * (codes_total / entropy_total - 1.0) if entropy_total else None,
        "groups": _groups(tensors),
        "tensors": tensors,
    }
    if compare_codecs:
        report["compare_codecs"] = _compare_codecs(artifact_path)
    return report


def _compare_codecs(artifact_path) -> list[dict]:
    """Per codes section: the real bytes of every (layout x byte codec) and codes codec, and which one won."""
    art = read_artifact(artifact_path)
    chosen = {s["name"]: (s["codec"], s["layout"]) for s in art.manifest["sections"] if s["kind"] == "codes"}
    rows = []
    for name, value in art.tensors.items():
        if not isinstance(value, QuantizedTensor):
            continue
        codes = value.codes.numpy()
        est = estimate_codes_section(codes, value.bits)
        sizes = {}
        for codec, layout in est.bytes:
            blob = est.rans_model.encode() if codec == RANS else CODES_CODECS[codec].encode(codes, value.bits) \
                if layout is None else compress(est.streams[layout], codec)
            sizes[f"{codec}/{layout}" if layout else codec] = len(blob)
        codec, layout = chosen[f"codes:{name}"]
        rows.append({"name": name, "bits": value.bits, "sizes": sizes,
                     "chosen": f"{codec}/{layout}" if layout else codec,
                     "estimates": {f"{c}/{l}" if l else c: e for (c, l), e in est.bytes.items()}})
    return rows


def _entropy_bounds(artifact_path) -> dict[str, EntropyBounds]:
    """Order-0, per-row and per-column conditional entropy of each tensor's codes, in bytes."""
    return {name: bytes_bound(value.codes.numpy()) for name, value in read_artifact(artifact_path).tensors.items()
            if isinstance(value, QuantizedTensor)}


def _groups(tensors: list[dict]) -> list[dict]:
    groups: dict[str, dict] = {}
    for t in tensors:
        g = groups.setdefault(t["role"], {"role": t["role"], "tensors": 0, "elements": 0, "raw_bytes": 0,
                                          "compressed_bytes": 0, "codes_bytes": 0, "entropy_bytes": 0.0,
                                          "row_entropy_bytes": 0.0})
        g["tensors"] += 1
        g["elements"] += t["elements"]
        g["raw_bytes"] += t["raw_bytes"]
        g["compressed_bytes"] += t["compressed_bytes"]
        g["entropy_bytes"] += t.get("entropy_bytes") or 0.0
        g["row_entropy_bytes"] += t.get("row_entropy_bytes") or 0.0
        g["codes_bytes"] += t["codes_bytes"] if t.get("entropy_bytes") is not None else 0
    for g in groups.values():
        g["bits_per_weight"] = 8.0 * g["compressed_bytes"] / g["elements"] if g["elements"] else 0.0
        g["overhead_pct"] = 100.0 * (g["codes_bytes"] / g["entropy_bytes"] - 1.0) if g["entropy_bytes"] else None
    return sorted(groups.values(), key=lambda g: -g["compressed_bytes"])
