"""Where every byte of a submission goes: per tensor, per role group, scales and metadata, code, headroom.

Compressed bytes of shared sections (fp16 scales, passthrough floats) are attributed to tensors in proportion to
their raw bytes (golfquant.artifact.artifact_sizes); the header and manifest are their own rows, so the rows add up
to the file size exactly. Entropy bounds are computed on the decoded integer codes. Overheads are the codes'
bytes over a bound, in percent (negative: the coder beats it); None where the bound is zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from golfquant.artifact import artifact_sizes, read_artifact
from golfquant.codec import CODES_CODECS, compress
from golfquant.codec.entropy import EntropyBounds, bytes_bound
from golfquant.codec.sizemodel import RANS, estimate_codes_section
from golfquant.plan import FLOAT_SCHEMES
from golfquant.quant import QuantizedTensor

CAP_BYTES = 16_000_000


@dataclass
class CodesEntropy:
    """A quantized tensor's codes against the entropy bounds of those codes (golfquant.codec.entropy), in bytes."""

    entropy_bytes: float  # order-0
    row_entropy_bytes: float  # per-row conditional
    col_entropy_bytes: float  # per-column conditional
    overhead_pct: float | None  # codes vs order-0
    row_overhead_pct: float | None  # codes vs per-row


@dataclass
class TensorBytes:
    """One tensor's compressed bytes (codes, scales, LQER factors or float data) and what it would take raw."""

    name: str
    role: str
    shape: tuple[int, ...]
    scheme: str
    bits: int | None  # None: stored as floats
    elements: int
    raw_bytes: int  # bits / 8 per element, or the float dtype's size
    compressed_bytes: int
    codes_bytes: int
    scales_bytes: int
    lqer_bytes: int
    salient_bytes: int
    bits_per_weight: float
    codec: str
    layout: str | None
    entropy: CodesEntropy | None  # None: float tensors, or a report made without entropy bounds


@dataclass
class RoleGroup:
    """The tensors of one role, summed; the entropy sums and codes_bytes cover only tensors with bounds."""

    role: str
    tensors: int
    elements: int
    raw_bytes: int
    compressed_bytes: int
    codes_bytes: int
    entropy_bytes: float
    row_entropy_bytes: float
    bits_per_weight: float
    overhead_pct: float | None


@dataclass
class CodecComparison:
    """One codes section: the real bytes of every "codec/layout" (a codes codec alone: "codec"), the estimate
    the writer ranked it by (None: no estimate, always tried), and the one written."""

    name: str
    bits: int
    sizes: dict[str, int]
    chosen: str
    estimates: dict[str, float | None]


@dataclass
class SizeReport:
    """Where every byte goes: artifact + code against the budget. entropy_bytes, row_entropy_bytes and
    overhead_pct are None for a report made without entropy bounds; codes_bytes covers the tensors with bounds."""

    artifact: Path
    artifact_bytes: int
    code_bytes: int
    total_bytes: int
    budget: int
    headroom_bytes: int  # negative: over the budget
    header_bytes: int
    manifest_bytes: int
    scales_bytes: int
    entropy_bytes: float | None
    row_entropy_bytes: float | None
    codes_bytes: int
    overhead_pct: float | None
    groups: list[RoleGroup]  # largest first
    tensors: list[TensorBytes]  # in the artifact's order
    compare_codecs: list[CodecComparison] | None = None  # None: not asked for


def size_report(artifact_path, code_bytes: int = 0, budget: int = CAP_BYTES, entropy: bool = True,
                compare_codecs: bool = False) -> SizeReport:
    """The report of an artifact file. compare_codecs: also the real size of every codec x layout for every codes
    section (compresses each of them: slow on a full-size artifact)."""
    info = artifact_sizes(artifact_path)
    bounds = _entropy_bounds(artifact_path) if entropy else {}
    tensors = []
    for t in info.tensors:
        raw = t.numel * t.bits // 8 if t.bits else t.numel * FLOAT_SCHEMES.get(t.scheme, torch.float32).itemsize
        b = bounds.get(t.name)
        codes_entropy = None if b is None else CodesEntropy(b.order0, b.rows, b.cols,
                                                            _overhead_pct(t.codes_bytes, b.order0),
                                                            _overhead_pct(t.codes_bytes, b.rows))
        tensors.append(TensorBytes(
            name=t.name, role=t.role, shape=t.shape, scheme=t.scheme, bits=t.bits, elements=t.numel, raw_bytes=raw,
            compressed_bytes=t.total, codes_bytes=t.codes_bytes, scales_bytes=t.scales_bytes,
            lqer_bytes=t.lqer_bytes, salient_bytes=t.salient_bytes, bits_per_weight=t.bits_per_weight, codec=t.codec,
            layout=t.layout,
            entropy=codes_entropy))
    total = info.total_bytes + code_bytes
    entropy_total = sum(b.order0 for b in bounds.values()) if entropy else None
    codes_total = sum(t.codes_bytes for t in info.tensors if t.name in bounds)
    return SizeReport(
        artifact=Path(artifact_path), artifact_bytes=info.total_bytes, code_bytes=code_bytes, total_bytes=total,
        budget=budget, headroom_bytes=budget - total, header_bytes=info.header_bytes,
        manifest_bytes=info.manifest_bytes, scales_bytes=sum(t.scales_bytes for t in info.tensors),
        entropy_bytes=entropy_total, row_entropy_bytes=sum(b.rows for b in bounds.values()) if entropy else None,
        codes_bytes=codes_total, overhead_pct=_overhead_pct(codes_total, entropy_total),
        groups=_groups(tensors), tensors=tensors,
        compare_codecs=_compare_codecs(artifact_path) if compare_codecs else None)


def _overhead_pct(codes_bytes: int, bound: float | None) -> float | None:
    return 100.0 * (codes_bytes / bound - 1.0) if bound else None


def _compare_codecs(artifact_path) -> list[CodecComparison]:
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
        rows.append(CodecComparison(name=name, bits=value.bits, sizes=sizes,
                                    chosen=f"{codec}/{layout}" if layout else codec,
                                    estimates={f"{c}/{l}" if l else c: e for (c, l), e in est.bytes.items()}))
    return rows


def _entropy_bounds(artifact_path) -> dict[str, EntropyBounds]:
    """Order-0, per-row and per-column conditional entropy of each tensor's codes, in bytes."""
    return {name: bytes_bound(value.codes.numpy()) for name, value in read_artifact(artifact_path).tensors.items()
            if isinstance(value, QuantizedTensor)}


def _groups(tensors: list[TensorBytes]) -> list[RoleGroup]:
    by_role: dict[str, list[TensorBytes]] = {}
    for t in tensors:
        by_role.setdefault(t.role, []).append(t)
    groups = []
    for role, mine in by_role.items():
        bounded = [t for t in mine if t.entropy is not None]
        elements = sum(t.elements for t in mine)
        compressed = sum(t.compressed_bytes for t in mine)
        codes = sum(t.codes_bytes for t in bounded)
        entropy = sum((t.entropy.entropy_bytes for t in bounded), 0.0)
        groups.append(RoleGroup(
            role=role, tensors=len(mine), elements=elements, raw_bytes=sum(t.raw_bytes for t in mine),
            compressed_bytes=compressed, codes_bytes=codes, entropy_bytes=entropy,
            row_entropy_bytes=sum((t.entropy.row_entropy_bytes for t in bounded), 0.0),
            bits_per_weight=8.0 * compressed / elements if elements else 0.0,
            overhead_pct=_overhead_pct(codes, entropy)))
    return sorted(groups, key=lambda g: -g.compressed_bytes)
