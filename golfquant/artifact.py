"""The artifact container (format in docs/artifact.md): header, compressed JSON manifest, then sections.

Sections: one per quantized tensor's codes (layout and codec chosen per tensor by trying every candidate), one shared
section of fp16 scales, one shared section of passthrough tensors per element size, per-factor code sections for
LQER, and one code section for a tensor's salient column groups. A tensor quantized in a rotated basis records its
rotation in its manifest entry (no section: the rotation is two integers). The reader validates everything against
the file size before allocating, since artifacts come from strangers.

Writer, validating reader and size report share one module on purpose: they are three readings of one format, and
keeping them side by side is what keeps a field the writer emits from going unchecked by the reader.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from golfquant.atomic import atomic_write_bytes
from golfquant.codec import BYTE_CODECS, CODES_CODECS, check_codec_names, compress, compress_best, decompress
from golfquant.codec.sizemodel import RANS, estimate_codes_section, estimate_stream_bytes, order0_bytes
from golfquant.errors import ArtifactError, OptionError
from golfquant.pack import LAYOUTS, layouts_for, packed_length, unpack_codes
from golfquant.plan import (DTYPES, FLOAT_SCHEMES, INT_SCHEMES, ROLES, SCHEMES, TensorPlan, cast_to_scheme, dtype_name,
                            role_of, scheme_bits, scheme_of_dtype)
from golfquant.quant.qtensor import (MAX_BITS, MIN_BITS, LowRankFactors, QuantizedTensor, Rotation, SalientColumns,
                                     lqer_b_scale_count, qmax)
from kernels import PackedWeight
from kernels.dequant import check_rotation

MAGIC = b"GQA1"
VERSION = 1
_HEAD = struct.Struct("<4sHB")  # magic, version, length of the manifest codec name
_MANIFEST_HEAD = struct.Struct("<III")  # compressed and raw manifest lengths, crc32 of the compressed manifest
# Bounds checked before anything is allocated; far above what a 16 MB artifact can legitimately need.
MAX_FILE_BYTES = 1 << 30
MAX_MANIFEST_BYTES = 1 << 26
MAX_RAW_BYTES = 1 << 30  # sum of all decoded section lengths
MAX_NUMEL = 1 << 28  # sum of all tensor (and LQER factor) element counts
MAX_NDIM = 8
MAX_CODEC_NAME = 32
ROTATIONS = ("hadamard",)  # kinds of "rotate"; its seed is in [0, MAX_SEED]
MAX_SEED = 2**31 - 1

BYTE_LAYOUTS = ("bytes", "shuffle2", "shuffle4", "shuffle8")
SECTION_KINDS = ("codes", "scales", "data")
_SCALE_BYTES = 2  # fp16


@dataclass
class SectionInfo:
    index: int
    kind: str
    name: str
    codec: str
    layout: str | None
    raw_length: int
    length: int


@dataclass
class TensorSize:
    """Compressed bytes attributed to one tensor; shared sections are split in proportion to raw bytes."""

    name: str
    role: str
    scheme: str
    bits: int | None
    shape: tuple[int, ...]
    codec: str  # of the tensor's own codes section, or of the shared float section it sits in
    layout: str | None
    codes_bytes: int = 0
    scales_bytes: int = 0
    data_bytes: int = 0
    lqer_bytes: int = 0
    salient_bytes: int = 0  # the salient groups' codes and row scales
    rotation: Rotation | None = None  # costs no section bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def total(self) -> int:
        return self.codes_bytes + self.scales_bytes + self.data_bytes + self.lqer_bytes + self.salient_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total / self.numel if self.numel else 0.0


@dataclass
class ArtifactInfo:
    """Where every byte of an artifact goes: total == header + manifest + unattributed + sum of tensor totals."""

    path: Path | None  # None for an artifact encoded in memory and not written yet
    total_bytes: int
    header_bytes: int
    manifest_bytes: int
    manifest_codec: str
    unattributed_bytes: int
    sections: list[SectionInfo]
    tensors: list[TensorSize]


@dataclass
class EncodedArtifact:
    """An artifact's bytes and where they go, before anything is written: `save` writes it atomically."""

    data: bytes
    info: ArtifactInfo

    def save(self, path: str | os.PathLike) -> ArtifactInfo:
        atomic_write_bytes(path, self.data)
        self.info = replace(self.info, path=Path(path))
        return self.info


@dataclass
class Artifact:
    manifest: dict
    tensors: dict[str, QuantizedTensor | PackedWeight | torch.Tensor]  # float tensors in their stored dtype


# ----------------------------------------------------------------------------------------------------------- writing


@dataclass
class _Section:
    kind: str
    name: str
    codec: str
    layout: str | None
    raw_length: int
    blob: bytes


def _shuffle(data: bytes, stride: int) -> bytes:
    """Byte k of every element first, k = 0..stride-1 (separates fp16/fp32 high and low bytes for the codecs)."""
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, stride).T.tobytes()


def _unshuffle(data: bytes, stride: int) -> bytes:
    return np.frombuffer(data, dtype=np.uint8).reshape(stride, -1).T.tobytes()


def _shuffle_stride(layout: str) -> int:
    """K of a `shuffleK` byte layout."""
    return int(layout.removeprefix("shuffle"))


def _apply_byte_layout(data: bytes, layout: str) -> bytes:
    return data if layout == "bytes" else _shuffle(data, _shuffle_stride(layout))


def _smallest(candidates: list[_Section]) -> _Section:
    return min(candidates, key=lambda s: len(s.blob))  # min keeps the first of equal sizes: deterministic


# Sections up to this many packed bytes are encoded with every candidate (cheap); larger ones only with the
# _FAST_TRIES best candidates by golfquant.codec.sizemodel's estimates, the runner-up only when its estimate is
# within _FAST_MARGIN of the best one (the estimates rank the real best first in 32 of 33 sampled sections,
# benchmarks/codecs.py), unless exhaustive.
_EXHAUSTIVE_BELOW = 16384
_FAST_TRIES = 2
_FAST_MARGIN = 0.03
# Byte streams past _SAMPLE_ABOVE are ranked by a sample of _SAMPLE_CHUNKS x _SAMPLE_CHUNK bytes compressed with every
# pair, the runner-up kept only within _FAST_MARGIN (tests/test_artifact.py holds it to the best fast codec).
_SAMPLE_ABOVE = 1 << 20
_SAMPLE_CHUNKS, _SAMPLE_CHUNK = 16, 16384


class _SectionMemo:
    """The sections encoded lately, by a digest of everything their encoding reads: a budget search or a sweep
    encodes mostly the same tensors again, and a section is a pure function of its input. The name only labels a
    section, so it is not in the key: the budget's price of a float tensor alone serves the writer's data section
    that holds just that tensor. Least recently used first out, past `limit` blob bytes."""

    def __init__(self, limit: int):
        self.limit, self.size, self.sections = limit, 0, OrderedDict()

    def get(self, data: bytes, options: tuple, name: str, make: Callable[[], _Section]) -> _Section:
        key = hashlib.blake2b(repr(options).encode() + b"\0" + data, digest_size=20).digest()
        if key in self.sections:
            self.sections.move_to_end(key)
            return replace(self.sections[key], name=name)
        section = self.sections[key] = make()
        self.size += len(section.blob)
        while self.size > self.limit:
            self.size -= len(self.sections.popitem(last=False)[1].blob)
        return section


_MEMO = _SectionMemo(64 << 20)


def _encode_codes(kind_name: str, codes: torch.Tensor, bits: int, byte_codecs: list[str], codes_codecs: list[str],
                  layouts: Iterable[str] | None, exhaustive: bool = False) -> _Section:
    """The smallest encoding over (layout x byte codec) pairs and codes codecs: of all of them for small sections
    or when exhaustive, else of the best predicted ones (and of any codes codec that has no estimator)."""
    arr = codes.detach().cpu().numpy()
    layouts = None if layouts is None else list(layouts)
    options = ("codes", bits, arr.dtype.str, arr.shape, byte_codecs, codes_codecs, layouts, exhaustive)
    return _MEMO.get(arr.tobytes(), options, kind_name, lambda: _encode_codes_now(kind_name, arr, bits, byte_codecs,
                                                                                  codes_codecs, layouts, exhaustive))


def _encode_codes_now(kind_name: str, arr: np.ndarray, bits: int, byte_codecs: list[str], codes_codecs: list[str],
                      layouts: list[str] | None, exhaustive: bool) -> _Section:
    est = estimate_codes_section(arr, bits, byte_codecs, codes_codecs, layouts)
    if not est.bytes:
        allowed = [name for name in layouts_for(bits, arr.ndim) if layouts is None or name in layouts]
        raise OptionError(f"no layout/codec pair to encode '{kind_name}': allow one of {', '.join(allowed or LAYOUTS)}")
    everything = exhaustive or max(map(len, est.streams.values()), default=arr.size) <= _EXHAUSTIVE_BELOW
    candidates, estimated = [], 0
    best_estimate = min((b for b in est.bytes.values() if b is not None), default=None)
    for codec, layout in (list(est.bytes) if everything else est.ranked()):
        guess = est.bytes[(codec, layout)]
        if not everything and guess is not None:
            if estimated == _FAST_TRIES or guess > (1 + _FAST_MARGIN) * best_estimate:
                continue
            estimated += 1
        if layout is None:
            blob = est.rans_model.encode() if codec == RANS and est.rans_model is not None \
                else CODES_CODECS[codec].encode(arr, bits)
            candidates.append(_Section("codes", kind_name, codec, None, arr.size, blob))
        else:
            packed = est.streams[layout]
            candidates.append(_Section("codes", kind_name, codec, layout, len(packed), compress(packed, codec)))
    return _smallest(_in_registry_order(candidates, byte_codecs, codes_codecs))


def _in_registry_order(candidates: list[_Section], byte_codecs: list[str], codes_codecs: list[str]
                       ) -> list[_Section]:
    """Layout-major, then byte codecs, then codes codecs: equal sizes resolve the same way in every mode."""
    layout_rank = {name: i for i, name in enumerate(LAYOUTS)}
    codec_rank = {name: i for i, name in enumerate([*byte_codecs, *codes_codecs])}
    return sorted(candidates, key=lambda s: (s.layout is None, layout_rank.get(s.layout, 0), codec_rank[s.codec]))


def _encode_bytes(kind: str, name: str, raw: bytes, itemsize: int, byte_codecs: list[str],
                  exhaustive: bool = False) -> _Section:
    """Plain and byte-shuffled layouts x byte codecs; past _EXHAUSTIVE_BELOW only the best predicted pairs (past
    _SAMPLE_ABOVE, predicted by a compressed sample)."""
    return _MEMO.get(raw, ("bytes", kind, itemsize, byte_codecs, exhaustive), name,
                     lambda: _encode_bytes_now(kind, name, raw, itemsize, byte_codecs, exhaustive))


def _encode_bytes_now(kind: str, name: str, raw: bytes, itemsize: int, byte_codecs: list[str],
                      exhaustive: bool) -> _Section:
    layouts = ["bytes"] + ([f"shuffle{itemsize}"] if itemsize > 1 else [])
    streams = {layout: _apply_byte_layout(raw, layout) for layout in layouts}
    pairs = [(layout, c) for layout in layouts for c in byte_codecs]
    if not exhaustive and len(raw) > _SAMPLE_ABOVE:
        # ranked by compressing a sample: the size model cannot see repeats (an embedding's near-identical rows)
        samples = {layout: _sample(data) for layout, data in streams.items()}
        guess = [len(compress(samples[layout], c)) for layout, c in pairs]
        ranked = sorted(range(len(pairs)), key=lambda i: (guess[i], i))
        pairs = [pairs[i] for i in sorted(ranked[:_FAST_TRIES])
                 if guess[i] <= (1 + _FAST_MARGIN) * guess[ranked[0]]]
    elif not exhaustive and len(raw) > _EXHAUSTIVE_BELOW:
        entropy = {layout: order0_bytes(data) for layout, data in streams.items()}
        ranked = sorted(range(len(pairs)), key=lambda i: (
            estimate_stream_bytes(streams[pairs[i][0]], pairs[i][1], entropy[pairs[i][0]]), i))
        pairs = [pairs[i] for i in sorted(ranked[:_FAST_TRIES])]
    return _smallest([_Section(kind, name, c, layout, len(raw), compress(streams[layout], c)) for layout, c in pairs])


def float_tensor_bytes(t: torch.Tensor, exhaustive: bool = False) -> int:
    """What a float tensor costs alone in a data section, compressed as the writer would: the budget prices float
    candidates with it, since a tensor of near-identical rows (an embedding's rarely seen tokens) shrinks a lot."""
    return len(_encode_bytes("data", "", _raw_bytes(t), t.element_size(), list(BYTE_CODECS), exhaustive).blob)


def _sample(data: bytes) -> bytes:
    """_SAMPLE_CHUNKS evenly spaced chunks of _SAMPLE_CHUNK bytes."""
    step = len(data) // _SAMPLE_CHUNKS
    return b"".join(data[i * step:i * step + _SAMPLE_CHUNK] for i in range(_SAMPLE_CHUNKS))


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _describe(name: str, value: QuantizedTensor | torch.Tensor, plan_entry: TensorPlan | str | None) -> dict:
    """The manifest entry (without section refs) of one tensor, checked against its plan entry."""
    is_quant = isinstance(value, QuantizedTensor)
    shape = list(value.shape)
    if isinstance(plan_entry, TensorPlan):
        role, scheme, dtype = plan_entry.role, plan_entry.scheme, plan_entry.dtype
        if list(plan_entry.shape) != shape:
            raise ValueError(f"tensor '{name}' has shape {shape} but its plan says {list(plan_entry.shape)}")
    else:
        role = plan_entry or role_of(name)
        scheme = f"int{value.bits}" if is_quant else scheme_of_dtype(value.dtype)
        dtype = "float32" if is_quant else dtype_name(value.dtype)
    if role not in ROLES:
        raise ValueError(f"tensor '{name}' has unknown role '{role}': use one of {', '.join(ROLES)}")
    if is_quant != (scheme in INT_SCHEMES) or (is_quant and value.bits != scheme_bits(scheme)):
        got = f"a {value.bits}-bit QuantizedTensor" if is_quant else "a float tensor"
        raise ValueError(f"tensor '{name}' is {got} but its plan scheme is {scheme}")
    return {"name": name, "shape": shape, "dtype": dtype, "role": role, "scheme": scheme,
            "bits": value.bits if is_quant else None, "kind": "quant" if is_quant else "float"}


def _check_lqer(name: str, lqer: LowRankFactors, shape: list[int]) -> None:
    rank = lqer.a_codes.shape[-1] if lqer.a_codes.dim() == 2 else -1
    cols = shape[-1] if shape else -1
    ok = (len(shape) >= 2 and tuple(lqer.a_codes.shape) == (shape[-2], rank)
          and tuple(lqer.b_codes.shape) == (rank, cols)
          and lqer.group >= 1 and tuple(lqer.a_scale.shape) == ()
          and tuple(lqer.b_scales.shape) == (lqer_b_scale_count(rank, cols, lqer.group),)
          and lqer.a_scale.dtype == torch.float16 and lqer.b_scales.dtype == torch.float16)
    if not ok:
        raise ValueError(f"LQER factors of '{name}' do not fit its shape {shape} (see LowRankFactors)")


def _groups_ok(groups: Any, count: int) -> bool:
    """Salient group indexes: a non-empty, strictly ascending list of ints in [0, count)."""
    return (isinstance(groups, (list, tuple)) and len(groups) > 0 and all(type(g) is int for g in groups)
            and 0 <= groups[0] and groups[-1] < count and all(a < b for a, b in zip(groups, groups[1:])))


def _check_salient(name: str, qt: QuantizedTensor, shape: list[int]) -> None:
    sal = qt.salient
    cols = shape[-1] if shape else 0
    ok = (len(shape) >= 2 and sal.group >= 1 and cols % sal.group == 0 and _groups_ok(sal.groups, cols // sal.group)
          and qt.bits < sal.bits <= MAX_BITS and sal.codes.dtype == torch.int8 and sal.scales.dtype == torch.float16
          and tuple(sal.codes.shape) == (*shape[:-1], len(sal.groups) * sal.group)
          and tuple(sal.scales.shape) == tuple(shape[:-1]))
    if not ok:
        raise ValueError(f"salient groups of '{name}' do not fit its shape {shape} and width (see SalientColumns)")
    if bool(qt.codes[..., sal.columns()].any()):
        raise ValueError(f"'{name}' has nonzero main codes in its salient columns (they must hold 0)")


def _rotation_entry(name: str, rotation: Rotation, shape: list[int]) -> dict:
    try:
        check_rotation(rotation, shape)
    except ValueError as e:
        raise ValueError(f"tensor '{name}': {e}") from None
    return {"kind": "hadamard", "block": rotation.block, "seed": rotation.seed}


def write_artifact(path: str | os.PathLike, tensors: Mapping[str, QuantizedTensor | torch.Tensor],
                   plan: Mapping[str, TensorPlan | str] | None, meta: Mapping[str, Any] | None = None,
                   codecs: Iterable[str] | None = None, layouts: Iterable[str] | None = None,
                   exhaustive: bool = False) -> ArtifactInfo:
    """Write `tensors` atomically (encode_artifact, then save)."""
    return encode_artifact(tensors, plan, meta, codecs, layouts, exhaustive).save(path)


def encode_artifact(tensors: Mapping[str, QuantizedTensor | torch.Tensor], plan: Mapping[str, TensorPlan | str] | None,
                    meta: Mapping[str, Any] | None = None, codecs: Iterable[str] | None = None,
                    layouts: Iterable[str] | None = None, exhaustive: bool = False) -> EncodedArtifact:
    """The artifact of `tensors`, in memory; the same input gives the same bytes.

    Each section of more than 16 KiB is compressed only with the two candidates (layout x codec) that
    golfquant.codec.sizemodel predicts smallest; exhaustive=True compresses every candidate (minutes at 16 MB).

    plan: name -> TensorPlan (role, scheme, original dtype; float tensors are cast to the scheme's dtype), or
    name -> role string, or None (roles from names, tensors stored as given). codecs: byte and/or codes codec names to
    try (default all); layouts: code layouts to try (default all valid). meta: JSON-serializable extras.
    """
    names = check_codec_names(codecs) if codecs is not None else [*BYTE_CODECS, *CODES_CODECS]
    byte_codecs = [n for n in BYTE_CODECS if n in names]  # registry order: the tie-break order
    codes_codecs = [n for n in CODES_CODECS if n in names]
    if not byte_codecs:
        raise OptionError(f"name at least one byte codec ({', '.join(BYTE_CODECS)}): scales and float tensors need one")
    layouts = None if layouts is None else list(layouts)
    for layout in layouts or []:
        if layout not in LAYOUTS:
            raise OptionError(f"unknown layout '{layout}': use one of {', '.join(LAYOUTS)}")
    if plan is not None:
        missing = [n for n in tensors if n not in plan]
        if missing:
            raise ValueError(f"the plan has no entry for tensor '{missing[0]}'")

    sections: list[_Section] = []
    entries: list[dict] = []
    scales_raw: list[bytes] = []
    data_raw: dict[int, list[bytes]] = {}
    scales_len = 0
    data_len: dict[int, int] = {}

    def add_scales(t: torch.Tensor) -> dict:
        nonlocal scales_len
        ref = {"section": "scales", "offset": scales_len}
        scales_raw.append(_raw_bytes(t))
        scales_len += len(scales_raw[-1])
        return ref

    def add_codes(kind_name: str, codes: torch.Tensor, bits: int) -> int:
        sections.append(_encode_codes(kind_name, codes, bits, byte_codecs, codes_codecs, layouts, exhaustive))
        return len(sections) - 1

    for name, value in tensors.items():
        entry = _describe(name, value, None if plan is None else plan[name])
        if isinstance(value, QuantizedTensor):
            entry["codes"] = add_codes(f"codes:{name}", value.codes, value.bits)
            entry["scales"] = add_scales(value.scales)
            entry["lqer"] = None
            if value.lqer is not None:
                lq = value.lqer
                _check_lqer(name, lq, entry["shape"])
                entry["lqer"] = {"rank": lq.a_codes.shape[1], "group": lq.group,
                                 "a_bits": lq.a_bits, "b_bits": lq.b_bits,
                                 "a_codes": add_codes(f"lqer.a:{name}", lq.a_codes, lq.a_bits),
                                 "b_codes": add_codes(f"lqer.b:{name}", lq.b_codes, lq.b_bits),
                                 "a_scale": add_scales(lq.a_scale), "b_scales": add_scales(lq.b_scales)}
            if value.salient is not None:  # the key only when present: artifacts without it are unchanged
                sal = value.salient
                _check_salient(name, value, entry["shape"])
                entry["salient"] = {"group": sal.group, "groups": list(sal.groups), "bits": sal.bits,
                                    "codes": add_codes(f"salient:{name}", sal.codes, sal.bits),
                                    "scales": add_scales(sal.scales)}
            if value.rotation is not None:  # absent when none: artifacts without rotations keep their bytes
                entry["rotate"] = _rotation_entry(name, value.rotation, entry["shape"])
        else:
            stored = cast_to_scheme(value, entry["scheme"])
            size = stored.element_size()
            data_raw.setdefault(size, []).append(_raw_bytes(stored))
            entry["data"] = {"section": size, "offset": data_len.get(size, 0), "dtype": dtype_name(stored.dtype)}
            data_len[size] = data_len.get(size, 0) + len(data_raw[size][-1])
        entries.append(entry)

    scales_index = len(sections)
    if scales_raw:
        sections.append(_encode_bytes("scales", "scales", b"".join(scales_raw), _SCALE_BYTES, byte_codecs, exhaustive))
    data_index = {}
    for size in sorted(data_raw):
        data_index[size] = len(sections)
        sections.append(_encode_bytes("data", f"data:{size}", b"".join(data_raw[size]), size, byte_codecs,
                                      exhaustive))
    for entry in entries:  # the shared sections' indexes are known only now
        if entry["kind"] == "float":
            entry["data"]["section"] = data_index[entry["data"]["section"]]
            continue
        lq = entry["lqer"]
        for ref in [entry["scales"]] + ([lq["a_scale"], lq["b_scales"]] if lq else []) \
                + ([entry["salient"]["scales"]] if "salient" in entry else []):
            ref["section"] = scales_index

    offset, section_entries = 0, []
    for s in sections:
        section_entries.append({"kind": s.kind, "name": s.name, "offset": offset, "length": len(s.blob),
                                "raw_length": s.raw_length, "codec": s.codec, "layout": s.layout,
                                "crc32": zlib.crc32(s.blob)})
        offset += len(s.blob)
    manifest = {"tensors": entries, "sections": section_entries, "meta": dict(meta or {})}
    try:
        manifest_json = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise OptionError(f"artifact meta must be JSON-serializable without NaN/inf: {e}") from None
    manifest_codec, manifest_blob = compress_best(manifest_json)
    header = _HEAD.pack(MAGIC, VERSION, len(manifest_codec)) + manifest_codec.encode("ascii") \
        + _MANIFEST_HEAD.pack(len(manifest_blob), len(manifest_json), zlib.crc32(manifest_blob))
    _validate_manifest(manifest, offset)  # the writer's output must pass the reader's checks
    data = header + manifest_blob + b"".join(s.blob for s in sections)
    return EncodedArtifact(data, _size_report(None, manifest, len(header), len(manifest_blob), manifest_codec))


# ----------------------------------------------------------------------------------------------------------- reading


def _fail(path: Path | str, what: str) -> ArtifactError:
    return ArtifactError(f"artifact {path}: {what}")


def _read_container(path: str | os.PathLike) -> tuple[dict, memoryview, int, int, str]:
    """(validated manifest, data region, header bytes, compressed manifest bytes, manifest codec)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise _fail(path, f"is {size} bytes, above the {MAX_FILE_BYTES}-byte limit")
        data = memoryview(path.read_bytes())
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e}): check the path") from None
    if len(data) < _HEAD.size or bytes(data[:4]) != MAGIC:
        raise _fail(path, f"is not a golfquant artifact (magic {bytes(data[:4])!r}, expected {MAGIC!r})")
    _, version, name_len = _HEAD.unpack_from(data)
    if version != VERSION:
        raise _fail(path, f"has format version {version}; this golfquant reads version {VERSION}")
    head_end = _HEAD.size + name_len + _MANIFEST_HEAD.size
    if name_len > MAX_CODEC_NAME or len(data) < head_end:
        raise _fail(path, "has a truncated or damaged header")
    try:
        manifest_codec = bytes(data[_HEAD.size : _HEAD.size + name_len]).decode("ascii")
    except UnicodeDecodeError:
        raise _fail(path, "has a damaged manifest codec name") from None
    m_len, m_raw, m_crc = _MANIFEST_HEAD.unpack_from(data, _HEAD.size + name_len)
    if m_len > len(data) - head_end or m_raw > MAX_MANIFEST_BYTES:
        raise _fail(path, f"declares a manifest of {m_len} bytes ({m_raw} raw) that does not fit the file")
    blob = data[head_end : head_end + m_len]
    if zlib.crc32(blob) != m_crc:
        raise _fail(path, "manifest checksum mismatch (the file is damaged)")
    try:
        raw = decompress(blob, manifest_codec, m_raw)
        if len(raw) != m_raw:
            raise ArtifactError(f"manifest decodes to {len(raw)} bytes, header says {m_raw}")
        manifest = json.loads(raw.decode("utf-8"))
        _validate_manifest(manifest, len(data) - head_end - m_len)
    except ArtifactError as e:
        raise _fail(path, str(e)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, f"manifest is not valid JSON: {e}") from None
    return manifest, data[head_end + m_len :], head_end, m_len, manifest_codec


def _bad(where: str, what: str) -> ArtifactError:
    return ArtifactError(f"manifest {where}: {what}")


def _get(obj: Any, key: str, where: str, kind: type | tuple) -> Any:
    if not isinstance(obj, dict):
        raise _bad(where, f"expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise _bad(where, f"lacks '{key}'")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not any(type(value) is k for k in kinds):  # exact types: JSON true must not pass as an int
        raise _bad(f"{where}.{key}", f"expected {'/'.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    return value


def _get_int(obj: Any, key: str, where: str, lo: int = 0, hi: int | None = None) -> int:
    value = _get(obj, key, where, int)
    if value < lo or (hi is not None and value > hi):
        raise _bad(f"{where}.{key}", f"{value} is outside [{lo}, {hi if hi is not None else 'inf'}]")
    return value


def _get_choice(obj: Any, key: str, where: str, choices: Iterable[str]) -> str:
    value = _get(obj, key, where, str)
    choices = tuple(choices)
    if value not in choices:
        raise _bad(f"{where}.{key}", f"unknown value '{value}' (known: {', '.join(choices)})")
    return value


def _check_keys(obj: dict, keys: set[str], where: str) -> None:
    if set(obj) != keys:
        raise _bad(where, f"has keys {sorted(obj)}, expected {sorted(keys)}")


_SECTION_KEYS = {"kind", "name", "offset", "length", "raw_length", "codec", "layout", "crc32"}
_TENSOR_KEYS = {"name", "shape", "dtype", "role", "scheme", "bits", "kind"}
_LQER_KEYS = {"rank", "group", "a_bits", "b_bits", "a_codes", "b_codes", "a_scale", "b_scales"}
_SALIENT_KEYS = {"group", "groups", "bits", "codes", "scales"}
_ROTATE_KEYS = {"kind", "block", "seed"}


def _validate_section(s: Any, where: str, offset: int) -> int:
    _get(s, "kind", where, str)
    _check_keys(s, _SECTION_KEYS, where)
    kind = _get_choice(s, "kind", where, SECTION_KINDS)
    _get(s, "name", where, str)
    if _get_int(s, "offset", where) != offset:
        raise _bad(f"{where}.offset", f"is {s['offset']}, expected {offset} (sections are contiguous)")
    _get_int(s, "crc32", where, 0, 2**32 - 1)
    raw_length = _get_int(s, "raw_length", where, 0, MAX_RAW_BYTES)
    codec = _get(s, "codec", where, str)
    if kind == "codes" and codec in CODES_CODECS:
        if s["layout"] is not None:
            raise _bad(f"{where}.layout", "must be null for a codes codec")
    else:
        _get_choice(s, "codec", where, BYTE_CODECS)
        layout = _get_choice(s, "layout", where, LAYOUTS if kind == "codes" else BYTE_LAYOUTS)
        if kind == "scales" and layout not in ("bytes", "shuffle2"):
            raise _bad(f"{where}.layout", f"'{layout}' does not fit fp16 scales")
        if layout.startswith("shuffle") and raw_length % _shuffle_stride(layout):
            raise _bad(f"{where}.raw_length", f"{raw_length} is not a multiple of the {layout} stride")
    return offset + _get_int(s, "length", where)


def _shape_of(entry: dict, where: str) -> tuple[int, ...]:
    shape = _get(entry, "shape", where, list)
    if len(shape) > MAX_NDIM or not all(type(d) is int and 0 <= d <= MAX_NUMEL for d in shape):
        raise _bad(f"{where}.shape", f"{shape} is not a list of at most {MAX_NDIM} sizes in [0, {MAX_NUMEL}]")
    return tuple(shape)


def _section_of(sections: list, index: Any, kind: str, where: str) -> dict:
    if type(index) is not int or not 0 <= index < len(sections) or sections[index]["kind"] != kind:
        raise _bad(where, f"{index!r} is not the index of a {kind} section")
    return sections[index]


def _check_codes_ref(sections: list, index: Any, shape: tuple[int, ...], bits: int, where: str) -> None:
    s = _section_of(sections, index, "codes", where)
    numel = math.prod(shape)
    if s["codec"] in CODES_CODECS:
        expected = numel
    elif s["layout"] in layouts_for(bits, len(shape)):
        expected = packed_length(numel, bits, s["layout"])
    else:
        raise _bad(where, f"layout '{s['layout']}' does not fit {bits}-bit codes of shape {list(shape)}")
    if s["raw_length"] != expected:
        raise _bad(where, f"codes section raw_length {s['raw_length']} != {expected} for shape {list(shape)}")


def _check_span(sections: list, ref: Any, nbytes: int, kind: str, where: str) -> None:
    _check_keys(ref, {"section", "offset"} | ({"dtype"} if kind == "data" else set()), where)
    s = _section_of(sections, _get(ref, "section", where, int), kind, f"{where}.section")
    offset = _get_int(ref, "offset", where)
    if offset + nbytes > s["raw_length"]:
        raise _bad(where, f"bytes [{offset}, {offset + nbytes}) exceed the {s['raw_length']}-byte {kind} section")


def _validate_lqer(lq: Any, sections: list, shape: tuple[int, ...], where: str) -> int:
    _get(lq, "rank", where, int)
    _check_keys(lq, _LQER_KEYS, where)
    if len(shape) < 2:
        raise _bad(where, "LQER needs a tensor of rank >= 2")
    rank = _get_int(lq, "rank", where, 0, MAX_NUMEL)
    group = _get_int(lq, "group", where, 1, MAX_NUMEL)
    a_shape, b_shape = (shape[-2], rank), (rank, shape[-1])
    for side, fshape in (("a", a_shape), ("b", b_shape)):
        bits = _get_int(lq, f"{side}_bits", where, MIN_BITS, MAX_BITS)
        _check_codes_ref(sections, lq[f"{side}_codes"], fshape, bits, f"{where}.{side}_codes")
    _check_span(sections, _get(lq, "a_scale", where, dict), _SCALE_BYTES, "scales", f"{where}.a_scale")
    _check_span(sections, _get(lq, "b_scales", where, dict), _SCALE_BYTES * lqer_b_scale_count(rank, shape[-1], group),
                "scales", f"{where}.b_scales")
    return math.prod(a_shape) + math.prod(b_shape)


def _salient_shape(shape: tuple[int, ...], sal: dict) -> tuple[int, ...]:
    return shape[:-1] + (len(sal["groups"]) * sal["group"],)


def _validate_salient(sal: Any, sections: list, shape: tuple[int, ...], bits: int, where: str) -> int:
    """A present "salient" entry (absent when the tensor has none: null is refused, one meaning per artifact);
    whether the main codes hold 0 in its columns is checked when they are decoded."""
    _get(sal, "group", where, int)
    _check_keys(sal, _SALIENT_KEYS, where)
    if len(shape) < 2:
        raise _bad(where, "salient groups need a tensor of rank >= 2")
    group = _get_int(sal, "group", where, 1, MAX_NUMEL)
    if shape[-1] % group:
        raise _bad(f"{where}.group", f"{group} does not divide the {shape[-1]} input columns")
    if not _groups_ok(_get(sal, "groups", where, list), shape[-1] // group):
        raise _bad(f"{where}.groups",
                   f"must be a non-empty, strictly ascending list of ints in [0, {shape[-1] // group})")
    sal_bits = _get_int(sal, "bits", where, MIN_BITS, MAX_BITS)
    if sal_bits <= bits:
        raise _bad(f"{where}.bits", f"{sal_bits} is not above the tensor's {bits} bits")
    _check_codes_ref(sections, sal["codes"], _salient_shape(shape, sal), sal_bits, f"{where}.codes")
    _check_span(sections, _get(sal, "scales", where, dict), _SCALE_BYTES * math.prod(shape[:-1]), "scales",
                f"{where}.scales")
    return math.prod(_salient_shape(shape, sal))


def _validate_rotation(r: Any, shape: tuple[int, ...], where: str) -> None:
    _get(r, "kind", where, str)
    _check_keys(r, _ROTATE_KEYS, where)
    _get_choice(r, "kind", where, ROTATIONS)
    cols = shape[-1]
    block = _get_int(r, "block", where, 2, cols)
    if block & (block - 1) or cols % block:
        raise _bad(f"{where}.block", f"{block} is not a power of two dividing the last dim {cols}")
    _get_int(r, "seed", where, 0, MAX_SEED)


def _validate_tensor(t: Any, sections: list, where: str, names: set) -> int:
    """Check one tensor entry and its references; return its element count (LQER factors included)."""
    name = _get(t, "name", where, str)
    where = f"tensor '{name}'"
    if name in names:
        raise _bad(where, "appears twice")
    names.add(name)
    kind = _get_choice(t, "kind", where, ("quant", "float"))
    # the optional keys only when present: artifacts without them keep their bytes, and null is refused
    _check_keys(t, _TENSOR_KEYS | ({"codes", "scales", "lqer"} | ({"salient", "rotate"} & set(t)) if kind == "quant"
                                   else {"data"}), where)
    shape = _shape_of(t, where)
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise _bad(where, f"{numel} elements exceed the {MAX_NUMEL} limit")
    dtype = _get_choice(t, "dtype", where, DTYPES)
    _get_choice(t, "role", where, ROLES)
    scheme = _get_choice(t, "scheme", where, SCHEMES)
    if kind == "quant":
        bits = _get(t, "bits", where, int)
        if scheme not in INT_SCHEMES or bits != scheme_bits(scheme) or not shape or not DTYPES[dtype].is_floating_point:
            raise _bad(where, f"quantized entry with scheme {scheme}, bits {bits}, shape {list(shape)}, dtype {dtype}")
        _check_codes_ref(sections, t["codes"], shape, bits, f"{where}.codes")
        _check_span(sections, _get(t, "scales", where, dict), _SCALE_BYTES * math.prod(shape[:-1]), "scales",
                    f"{where}.scales")
        lq = _get(t, "lqer", where, (dict, type(None)))
        if "salient" in t:
            numel += _validate_salient(t["salient"], sections, shape, bits, f"{where}.salient")
        if "rotate" in t:
            _validate_rotation(t["rotate"], shape, f"{where}.rotate")
        return numel + (0 if lq is None else _validate_lqer(lq, sections, shape, f"{where}.lqer"))
    if t["bits"] is not None:
        raise _bad(f"{where}.bits", "must be null for a float entry")
    ref = _get(t, "data", where, dict)
    stored = _get_choice(ref, "dtype", f"{where}.data", DTYPES)
    expected = dtype if scheme == "raw" else dtype_name(FLOAT_SCHEMES[scheme]) if scheme in FLOAT_SCHEMES else None
    if stored != expected:
        raise _bad(f"{where}.data.dtype", f"'{stored}' does not match scheme {scheme} of a {dtype} tensor")
    _check_span(sections, ref, numel * DTYPES[stored].itemsize, "data", f"{where}.data")
    return numel


def _validate_manifest(m: Any, data_len: int) -> None:
    """Schema, types, bounds and cross-references of a manifest whose sections span `data_len` bytes."""
    if not isinstance(m, dict):
        raise _bad("root", f"expected an object, got {type(m).__name__}")
    _check_keys(m, {"tensors", "sections", "meta"}, "root")
    _get(m, "meta", "root", dict)
    sections = _get(m, "sections", "root", list)
    end = 0
    for i, s in enumerate(sections):
        end = _validate_section(s, f"sections[{i}]", end)
    if end != data_len:
        raise _bad("sections", f"cover {end} bytes but the file holds {data_len} bytes of section data")
    if sum(s["raw_length"] for s in sections) > MAX_RAW_BYTES:
        raise _bad("sections", f"decode to more than {MAX_RAW_BYTES} bytes")
    names: set[str] = set()
    total = sum(_validate_tensor(t, sections, f"tensors[{i}]", names)
                for i, t in enumerate(_get(m, "tensors", "root", list)))
    if total > MAX_NUMEL:
        raise _bad("tensors", f"hold {total} elements, above the {MAX_NUMEL} limit")


def _section_payload(region: memoryview, s: dict, where: str) -> bytes:
    """Decoded bytes of a byte-codec section: crc, bounded decompression, exact length, byte layout undone."""
    blob = region[s["offset"] : s["offset"] + s["length"]]
    if zlib.crc32(blob) != s["crc32"]:
        raise ArtifactError(f"{where}: checksum mismatch (the file is damaged)")
    raw = decompress(blob, s["codec"], s["raw_length"])
    if len(raw) != s["raw_length"]:
        raise ArtifactError(f"{where}: decodes to {len(raw)} bytes, manifest says {s['raw_length']}")
    if s["kind"] == "codes" or s["layout"] == "bytes":
        return raw
    return _unshuffle(raw, _shuffle_stride(s["layout"]))


def _code_refs(t: dict) -> dict[str, tuple[int, tuple[int, ...], int]]:
    """(codes section, shape, bits) of a quantized tensor's codes ("codes"), of its LQER factors ("a", "b") and of
    its salient groups ("salient")."""
    shape = tuple(t["shape"])
    refs = {"codes": (t["codes"], shape, t["bits"])}
    if "salient" in t:
        refs["salient"] = (t["salient"]["codes"], _salient_shape(shape, t["salient"]), t["salient"]["bits"])
    lq = t["lqer"]
    if lq is not None:
        refs["a"] = (lq["a_codes"], (shape[-2], lq["rank"]), lq["a_bits"])
        refs["b"] = (lq["b_codes"], (lq["rank"], shape[-1]), lq["b_bits"])
    return refs


def _codes_blob(region: memoryview, s: dict, where: str) -> bytes:
    blob = bytes(region[s["offset"] : s["offset"] + s["length"]])
    if zlib.crc32(blob) != s["crc32"]:
        raise ArtifactError(f"{where}: checksum mismatch (the file is damaged)")
    return blob


def _decode_together(region: memoryview, manifest: dict, path: str | os.PathLike
                     ) -> dict[tuple[int, tuple[int, ...], int], np.ndarray]:
    """Codes of every section whose codes codec has `decode_many`, by (section, shape, bits), each codec's sections
    in one call: rANS decodes the lanes of all of them together, one numpy step per step index instead of one per
    step of every section (most of a load's time otherwise). Other sections are decoded one at a time
    (_decode_codes)."""
    sections = manifest["sections"]
    todo: dict[str, dict[tuple[int, tuple[int, ...], int], str]] = {}  # codec -> key -> where
    for t in manifest["tensors"]:
        for key in _code_refs(t).values() if t["kind"] == "quant" else ():
            name = sections[key[0]]["codec"]
            if getattr(CODES_CODECS.get(name), "decode_many", None) is not None:
                todo.setdefault(name, {}).setdefault(key, f"artifact {path}: tensor '{t['name']}' sections[{key[0]}]")
    decoded = {}
    for name, keys in todo.items():
        items = [(_codes_blob(region, sections[index], where), shape, bits)
                 for (index, shape, bits), where in keys.items()]
        decoded.update(zip(keys, CODES_CODECS[name].decode_many(items, list(keys.values()))))
    return decoded


def _decode_codes(region: memoryview, s: dict, shape: tuple[int, ...], bits: int, where: str,
                  arr: np.ndarray | None = None) -> torch.Tensor:
    """Codes of a section; `arr`: those its codes codec already decoded (see _decode_together)."""
    if s["codec"] not in CODES_CODECS:
        return unpack_codes(_section_payload(region, s, where), bits, s["layout"], shape)
    if arr is None:
        arr = CODES_CODECS[s["codec"]].decode(_codes_blob(region, s, where), shape, bits)
    r = qmax(bits)
    if not isinstance(arr, np.ndarray) or arr.dtype != np.int8 or arr.shape != shape \
            or (arr.size and (int(arr.min()) < -r or int(arr.max()) > r)):
        raise ArtifactError(f"{where}: codec '{s['codec']}' returned codes that do not fit {bits} bits x {list(shape)}")
    return torch.from_numpy(np.array(arr))


def _frombuffer(raw: bytes, offset: int, shape: tuple[int, ...], dtype_str: str, where: str) -> torch.Tensor:
    dtype = DTYPES[dtype_str]
    nbytes = math.prod(shape) * dtype.itemsize
    chunk = bytearray(raw[offset : offset + nbytes])
    if dtype == torch.bool and chunk and int(np.frombuffer(chunk, dtype=np.uint8).max()) > 1:
        raise ArtifactError(f"{where}: bool data holds bytes other than 0 and 1")
    if not chunk:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(chunk, dtype=dtype).reshape(shape)




def read_artifact(path: str | os.PathLike, packed: bool = False) -> Artifact:
    """Validate and decode every section; quantized tensors come back as QuantizedTensor (or, with packed=True, as
    kernels.PackedWeight with the codes left in their bit layout and LQER as fp32 (A, B)), floats as stored."""
    manifest, region, _, _, _ = _read_container(path)
    sections = manifest["sections"]
    payloads: dict[int, bytes] = {}

    def payload(index: int) -> bytes:
        if index not in payloads:
            payloads[index] = _section_payload(region, sections[index], f"artifact {path}: sections[{index}]")
        return payloads[index]

    def scales(ref: dict, shape: tuple[int, ...], where: str) -> torch.Tensor:
        return _frombuffer(payload(ref["section"]), ref["offset"], shape, "float16", where)

    decoded = _decode_together(region, manifest, path)

    def codes(key: tuple[int, tuple[int, ...], int], where: str) -> torch.Tensor:
        index, shape, bits = key
        return _decode_codes(region, sections[index], shape, bits, f"{where} sections[{index}]", decoded.get(key))

    tensors: dict[str, QuantizedTensor | PackedWeight | torch.Tensor] = {}
    for t in manifest["tensors"]:
        where = f"artifact {path}: tensor '{t['name']}'"
        shape = tuple(t["shape"])
        if t["kind"] == "float":
            ref = t["data"]
            tensors[t["name"]] = _frombuffer(payload(ref["section"]), ref["offset"], shape, ref["dtype"], where)
            continue
        refs = _code_refs(t)
        lqer = None
        if t["lqer"] is not None:
            lq = t["lqer"]
            lqer = LowRankFactors(
                a_codes=codes(refs["a"], where), a_scale=scales(lq["a_scale"], (), where), a_bits=lq["a_bits"],
                b_codes=codes(refs["b"], where),
                b_scales=scales(lq["b_scales"], (lqer_b_scale_count(lq["rank"], shape[-1], lq["group"]),), where),
                b_bits=lq["b_bits"], group=lq["group"])
        row_scales = scales(t["scales"], shape[:-1], where)
        sal = None
        if "salient" in t:
            sa = t["salient"]
            sal = SalientColumns(tuple(sa["groups"]), sa["group"], codes(refs["salient"], where),
                                 scales(sa["scales"], shape[:-1], where), sa["bits"])
        s = sections[t["codes"]]
        if packed:
            data, layout, main = _packed_codes(region, s, shape, t["bits"], where, lambda: codes(refs["codes"], where))
            factors = None if lqer is None else (lqer.a(), lqer.b())
            packed_sal = None
            if sal is not None:
                sdata, slayout, _ = _packed_codes(region, sections[refs["salient"][0]], refs["salient"][1], sal.bits,
                                                  where, lambda: sal.codes)
                packed_sal = (sal.columns(), PackedWeight(sdata, sal.bits, slayout, refs["salient"][1], sal.scales))
            value = PackedWeight(data, t["bits"], layout, shape, row_scales, factors, packed_sal, _rotation(t))
        else:
            main = codes(refs["codes"], where)
            value = QuantizedTensor(main, row_scales, t["bits"], lqer, sal, _rotation(t))
        if sal is not None and bool(main[..., sal.columns()].any()):
            raise ArtifactError(f"{where}: nonzero main codes in the salient columns (they must hold 0)")
        tensors[t["name"]] = value
    return Artifact(manifest, tensors)


def _rotation(t: dict) -> Rotation | None:
    return Rotation(t["rotate"]["block"], t["rotate"]["seed"]) if "rotate" in t else None


def _packed_codes(region: memoryview, s: dict, shape: tuple[int, ...], bits: int, where: str,
                  codes: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, str, torch.Tensor]:
    """The section's bytes as stored in its bit layout, and its codes; codes from a codes codec (`codes()`) come
    back as the int8 layout."""
    if s["codec"] in CODES_CODECS:
        q = codes()
        return q.view(torch.uint8).reshape(-1).clone(), "int8", q
    raw = _section_payload(region, s, where)
    q = unpack_codes(raw, bits, s["layout"], shape)  # validates padding and code range before a kernel sees the bytes
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8), \
        s["layout"], q


def load_artifact(path: str | os.PathLike, dequantize: bool = True, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor | QuantizedTensor]:
    """A state_dict: float tensors (dequantized ones included) in their original dtype, or `dtype` when given.

    On a CUDA device the packed codes go to the GPU as stored and the Triton kernels dequantize them there.
    dequantize=False keeps quantized tensors as QuantizedTensor. Non-float tensors keep their dtype.
    """
    device = torch.device(device)
    on_gpu = dequantize and device.type == "cuda"
    art = read_artifact(path, packed=on_gpu)
    out: dict[str, torch.Tensor | QuantizedTensor] = {}
    for t in art.manifest["tensors"]:
        value = art.tensors[t["name"]]
        target = dtype or DTYPES[t["dtype"]]
        if isinstance(value, PackedWeight):
            out[t["name"]] = value.to(device).dequantize(target)
        elif isinstance(value, QuantizedTensor):
            value = value.to(device)
            out[t["name"]] = value.dequantize(target) if dequantize else value
        else:
            out[t["name"]] = value.to(device=device, dtype=target if value.is_floating_point() else value.dtype)
    return out


# ------------------------------------------------------------------------------------------------------ size report


def _apportion(total: int, weights: list[int]) -> list[int]:
    """Split `total` into integers proportional to `weights` (largest remainder; ties to the earlier part)."""
    if not weights:
        return []
    if sum(weights) == 0:
        weights = [1] * len(weights)
    w_sum = sum(weights)
    shares = [total * w // w_sum for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % w_sum), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _size_report(path: Path | None, m: dict, header_bytes: int, manifest_bytes: int, manifest_codec: str) -> ArtifactInfo:
    sections = m["sections"]
    rows = []
    for t in m["tensors"]:
        own = sections[t["codes"] if t["kind"] == "quant" else t["data"]["section"]]
        rows.append(TensorSize(t["name"], t["role"], t["scheme"], t["bits"], tuple(t["shape"]), own["codec"],
                               own["layout"], rotation=_rotation(t)))
    # per section: (row index, field, raw bytes) of every part that references it
    parts: dict[int, list[tuple[int, str, int]]] = {i: [] for i in range(len(sections))}
    for i, t in enumerate(m["tensors"]):
        if t["kind"] == "float":
            parts[t["data"]["section"]].append((i, "data_bytes", rows[i].numel * DTYPES[t["data"]["dtype"]].itemsize))
            continue
        parts[t["codes"]].append((i, "codes_bytes", 1))
        parts[t["scales"]["section"]].append((i, "scales_bytes", _SCALE_BYTES * math.prod(t["shape"][:-1])))
        lq = t["lqer"]
        if lq is not None:
            n_b = lqer_b_scale_count(lq["rank"], t["shape"][-1], lq["group"])
            parts[lq["a_codes"]].append((i, "lqer_bytes", 1))
            parts[lq["b_codes"]].append((i, "lqer_bytes", 1))
            parts[lq["a_scale"]["section"]].append((i, "lqer_bytes", _SCALE_BYTES))
            parts[lq["b_scales"]["section"]].append((i, "lqer_bytes", _SCALE_BYTES * n_b))
        if "salient" in t:
            parts[t["salient"]["codes"]].append((i, "salient_bytes", 1))
            parts[t["salient"]["scales"]["section"]].append((i, "salient_bytes",
                                                             _SCALE_BYTES * math.prod(t["shape"][:-1])))
    unattributed = 0
    for index, refs in parts.items():
        length = sections[index]["length"]
        if not refs:
            unattributed += length
        for (row, attr, _), share in zip(refs, _apportion(length, [w for _, _, w in refs])):
            setattr(rows[row], attr, getattr(rows[row], attr) + share)
    infos = [SectionInfo(i, s["kind"], s["name"], s["codec"], s["layout"], s["raw_length"], s["length"])
             for i, s in enumerate(sections)]
    total = header_bytes + manifest_bytes + sum(s.length for s in infos)
    return ArtifactInfo(path, total, header_bytes, manifest_bytes, manifest_codec, unattributed, infos, rows)


def read_manifest(path: str | os.PathLike) -> dict:
    """The validated manifest of an artifact (docs/artifact.md). Decompresses no section."""
    return _read_container(path)[0]


def artifact_sizes(path: str | os.PathLike) -> ArtifactInfo:
    """Compressed bytes per section, and per tensor with the shared scales and data sections split in proportion to
    each tensor's raw bytes in them (header and manifest are their own rows). Decompresses nothing."""
    manifest, _, header_bytes, manifest_bytes, manifest_codec = _read_container(path)
    return _size_report(Path(path), manifest, header_bytes, manifest_bytes, manifest_codec)
