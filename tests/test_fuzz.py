"""Fuzzing the artifact reader: whatever the bytes, read_artifact/load_artifact succeed or raise ArtifactError.

Small valid artifacts cover every codec, every layout, widths 2..8, LQER factors, rotations and passthrough tensors. Four tiers
of damage, each reaching one level deeper into the reader: raw bytes (truncate, extend, flip, splice: stopped by the
header and checksums), section payloads re-sealed with valid checksums (reach the decompressors and code decoders),
forged manifests re-sealed with a valid header (reach the schema checks), and consistent forgeries (shapes, widths,
raw lengths that agree with each other, so decoding runs on lies). Every case has a time limit, and the whole module
runs under an address-space limit, so a hang or a huge allocation fails the test. Derandomized: CI is reproducible.
"""
from __future__ import annotations

import json
import math
import resource
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from golfquant.artifact import MAGIC, VERSION, load_artifact, read_artifact, write_artifact
from golfquant.codec import BYTE_CODECS, CODES_CODECS, compress, decompress
from golfquant.errors import ArtifactError
from golfquant.pack import LAYOUTS, packed_length
from golfquant.quant.qtensor import LowRankFactors, QuantizedTensor, Rotation, SalientColumns, qmax

CASE_SECONDS = 2.0  # a 1-3 KB artifact reads in milliseconds; anything near this is a hang
MEMORY_HEADROOM = 768 << 20  # address space the reader may add on top of the test process's
EXAMPLES = {"bytes": 3000, "payload": 2500, "manifest": 3000, "consistent": 2000}  # 10,500 cases
_counts = {tier: 0 for tier in EXAMPLES}


def _settings(tier: str):
    return settings(max_examples=EXAMPLES[tier], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------- valid artifacts


def _tensors(widths, seed: int) -> dict:
    """Quantized tensors of each width (odd sizes, so packed layouts have padding; a 3-D bank), LQER factors on the
    first, a rotated one, and passthrough fp16/bf16/fp32/float64/int64/bool tensors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for b in widths:
        r = qmax(b)
        shape = (5, 7) if b % 2 else (2, 3, 5)
        codes = torch.randint(-r, r + 1, shape, generator=g, dtype=torch.int8)
        out[f"blocks.0.mlp.w{b}"] = QuantizedTensor(codes, (torch.rand(shape[:-1], generator=g) / 50).half(), b)
    first = next(qt for qt in out.values() if qt.codes.dim() == 2)
    rows, cols = first.codes.shape
    first.lqer = LowRankFactors(
            a_codes=torch.randint(-1, 2, (rows, 2), generator=g, dtype=torch.int8), a_scale=torch.tensor(0.01).half(),
            a_bits=2, b_codes=torch.randint(-7, 8, (2, cols), generator=g, dtype=torch.int8),
            b_scales=(torch.rand(math.ceil(2 * cols / 4), generator=g) / 100).half(), b_bits=4, group=4)
    lo = min(widths)
    codes = torch.randint(-qmax(lo), qmax(lo) + 1, (3, 8), generator=g, dtype=torch.int8)
    out["blocks.0.attn.rot"] = QuantizedTensor(codes, torch.full((3,), 0.02).half(), lo, rotation=Rotation(4, seed))
    out |= {"f16": torch.randn(9, generator=g).half(), "bf16": torch.randn(3, 3, generator=g).bfloat16(),
            "f32": torch.randn(5, generator=g), "f64": torch.randn(2, generator=g).double(),
            "steps": torch.tensor([3, -4], dtype=torch.int64), "mask": torch.tensor([True, False, True])}
    return out


def _rans_tensors() -> dict:
    """Codes that make the rANS coder use each of its models: tiny (order-0), spread rows/columns (parametric) and
    repeated rows (split)."""
    g = torch.Generator().manual_seed(7)
    out = _tensors(range(2, 9), 3)
    wide = (torch.randn(24, 40, generator=g) * torch.linspace(0.5, 6, 24)[:, None]).round().clamp(-31, 31)
    out["blocks.1.mlp.fc.weight"] = QuantizedTensor(wide.to(torch.int8), torch.full((24,), 0.01).half(), 6)
    rows = torch.randint(-3, 4, (4, 16), generator=g, dtype=torch.int8)
    out["tok_emb.weight"] = QuantizedTensor(rows.repeat(5, 1), torch.full((20,), 0.02).half(), 3)
    return out


def _build(folder: Path) -> list[bytes]:
    specs = [(f"codec-{c}", _tensors(range(2, 9), i), [c], None) for i, c in enumerate(BYTE_CODECS)]
    specs.append(("codec-rans", _rans_tensors(), ["zlib", "rans"], []))  # no layout: every codes section is rANS
    layout_codecs = dict(zip(LAYOUTS, ["none", "zlib", "zstd", "brotli", "lzma", "none"]))
    for i, layout in enumerate(LAYOUTS):
        widths = range(2, 5) if layout.startswith("nibble") else range(2, 9)
        specs.append((f"layout-{layout}", _tensors(widths, 10 + i), [layout_codecs[layout]], [layout]))
    blobs, seen = [], {"codecs": set(), "layouts": set(), "bits": set(), "dtypes": set(), "lqer": 0, "rotate": 0}
    for name, tensors, codecs, layouts in specs:
        path = folder / f"{name}.gqa"
        write_artifact(path, tensors, None, {"case": name}, codecs=codecs, layouts=layouts)
        blobs.append(path.read_bytes())
        m = read_artifact(path).manifest
        seen["codecs"] |= {s["codec"] for s in m["sections"]}
        seen["layouts"] |= {s["layout"] for s in m["sections"] if s["kind"] == "codes"}
        seen["bits"] |= {t["bits"] for t in m["tensors"]}
        seen["dtypes"] |= {t["dtype"] for t in m["tensors"] if t["kind"] == "float"}
        seen["lqer"] += sum(t.get("lqer") is not None for t in m["tensors"])
        seen["rotate"] += sum("rotate" in t for t in m["tensors"])
    assert seen["codecs"] == set(BYTE_CODECS) | set(CODES_CODECS)
    assert seen["layouts"] >= set(LAYOUTS)
    assert seen["bits"] >= set(range(2, 9)) and seen["lqer"] >= len(specs) - 1 and seen["rotate"] >= len(specs) - 1
    assert seen["dtypes"] == {"float16", "bfloat16", "float32", "float64", "int64", "bool"}
    return blobs


class _Corpus(tuple):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case: not the whole corpus
        return f"<{len(self[1])} artifacts in {self[0]}>"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    return _Corpus((folder, _build(folder)))


def _process_bytes(field: str) -> int:
    """A size line of /proc/self/status (VmSize: address space, VmHWM: peak resident set), in bytes."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(f"{field}:"))


@pytest.fixture(scope="module", autouse=True)
def memory_limit(corpus):
    """Cap the address space while the cases run, so a reader that allocates far beyond a tiny file fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _process_bytes("VmSize") + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# --------------------------------------------------------------------------------------------- the check


def _lqer_group_bomb(manifest) -> bool:
    """LQER with a group far above its B factor: dequantizing it is test_lqer_huge_group_dequantizes_cheaply."""
    try:
        return any(t["lqer"]["group"] > 4 * max(1, t["lqer"]["rank"] * t["shape"][-1]) for t in manifest["tensors"]
                   if t.get("kind") == "quant" and t.get("lqer"))
    except (TypeError, KeyError, IndexError):
        return False


def check(folder: Path, data: bytes, tier: str) -> None:
    """read_artifact, and load_artifact when that succeeds: each returns or raises ArtifactError, quickly."""
    _counts[tier] += 1
    path = folder / "case.gqa"
    path.write_bytes(data)
    start = time.perf_counter()
    try:
        art = read_artifact(path)
        if not _lqer_group_bomb(art.manifest):
            load_artifact(path)
    except ArtifactError:
        pass
    elapsed = time.perf_counter() - start
    assert elapsed < CASE_SECONDS, f"a {len(data)}-byte case took {elapsed:.1f} s"


# --------------------------------------------------------------------------------------------- forging helpers


def split(data: bytes) -> tuple[str, dict, list[bytes]]:
    """(manifest codec, manifest, stored section blobs) of a valid artifact."""
    n = data[6]
    codec = data[7:7 + n].decode()
    m_len, m_raw, _ = struct.unpack_from("<III", data, 7 + n)
    start = 19 + n
    manifest = json.loads(decompress(data[start:start + m_len], codec, m_raw))
    region = data[start + m_len:]
    blobs = [region[s["offset"]:s["offset"] + s["length"]] for s in manifest["sections"]]
    return codec, manifest, blobs


def seal(manifest, blobs: list[bytes], codec: str = "zlib", fix_sections: bool = True) -> bytes:
    """An artifact with a valid header and manifest checksum; fix_sections also makes offsets, lengths and section
    checksums agree with `blobs`, so the reader gets past them to whatever was forged."""
    if fix_sections:
        offset = 0
        for s, blob in zip(manifest["sections"], blobs):
            s.update(offset=offset, length=len(blob), crc32=zlib.crc32(blob))
            offset += len(blob)
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    body = compress(raw, codec)
    return (struct.pack("<4sHB", MAGIC, VERSION, len(codec)) + codec.encode()
            + struct.pack("<III", len(body), len(raw), zlib.crc32(body)) + body + b"".join(blobs))


def _slots(node, out: list) -> list:
    """Every (container, key) of a JSON tree, outside the free-form meta object."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if key == "meta" and node is not None and isinstance(node, dict) and "sections" in node:
            continue
        out.append((node, key))
        _slots(value, out)
    return out


def _flip(data: bytes, pos: int, mask: int) -> bytes:
    if not data:
        return data
    pos %= len(data)
    return data[:pos] + bytes([data[pos] ^ mask]) + data[pos + 1:]


JUNK = [-1, 0, 1, 2, 3, 7, 8, 9, 255, 2**16, 2**28, 2**28 + 1, 2**30, 2**31, 2**32, 2**63, 2**64, -2**63, 10**30,
        1.5, 0.0, float("nan"), float("inf"), True, False, None, "", "x", "\u2603", *BYTE_CODECS, *CODES_CODECS,
        *LAYOUTS, "bytes", "shuffle2", "shuffle4", "shuffle8", "codes", "scales", "data", "quant", "float", "float16",
        "bfloat16", "float32", "float64", "int64", "bool", "uint8", "int2", "int8", "int9", "fp16", "bf16", "raw",
        "mlp", "control", [], [0], [1], [7, 5], [2**14, 2**14], [2**28], [2**28, 2**28], [-1, 3], [1] * 9, [1.5],
        [True], {}, {"section": 0, "offset": 0}, {"section": 0, "offset": 0, "dtype": "float16"}]


# --------------------------------------------------------------------------------------------- tier 1: raw bytes

_positions = st.one_of(st.integers(0, 40), st.integers(0, 1 << 16))  # the header, or anywhere
_byte_ops = st.one_of(
    st.tuples(st.just("truncate"), _positions),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("flip"), _positions, st.integers(1, 255)),
    st.tuples(st.just("overwrite"), _positions, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _positions, st.integers(1, 64)),
    st.tuples(st.just("splice"), st.integers(0, 100), _positions, st.integers(0, 1 << 16), st.integers(1, 512)),
)


def _apply_byte_op(data: bytes, op, blobs: list[bytes]) -> bytes:
    kind, *args = op
    if kind == "truncate":
        return data[:args[0] % (len(data) + 1)]
    if kind == "extend":
        return data + args[0]
    if kind == "flip":
        return _flip(data, *args)
    at = args[0] % (len(data) + 1)
    if kind == "overwrite":
        return data[:at] + args[1] + data[at + len(args[1]):]
    if kind == "delete":
        return data[:at] + data[at + args[1]:]
    other = blobs[args[0] % len(blobs)]  # splice: a chunk of another artifact inserted or written over
    src = args[2] % len(other)
    at = args[1] % (len(data) + 1)
    chunk = other[src:src + args[3]]
    return data[:at] + chunk + data[at + len(chunk):]


@given(which=st.integers(0, 100), ops=st.lists(_byte_ops, min_size=1, max_size=4))
@_settings("bytes")
def test_damaged_bytes(corpus, which, ops):
    folder, blobs = corpus
    data = blobs[which % len(blobs)]
    for op in ops:
        data = _apply_byte_op(data, op, blobs)
    check(folder, data, "bytes")


# --------------------------------------------------------------------------------------------- tier 2: payloads

_payload_ops = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("swap"), st.integers(0, 100)),  # another section's blob in its place
    st.tuples(st.just("raw_length"), st.integers(-3, 3)),  # a lie about the decoded size
    # decoded bytes changed and compressed again with the section's codec: reaches the code and bool checks
    st.tuples(st.just("decoded_flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("decoded_fill"), st.integers(0, 255)),
)


def _apply_payload_op(manifest: dict, blobs: list[bytes], index: int, op) -> None:
    s = manifest["sections"][index]
    kind, *args = op
    if kind == "flip":
        blobs[index] = _flip(blobs[index], *args)
    elif kind == "truncate":
        blobs[index] = blobs[index][:args[0] % (len(blobs[index]) + 1)]
    elif kind == "extend":
        blobs[index] += args[0]
    elif kind == "swap":
        blobs[index] = blobs[args[0] % len(blobs)]
    elif kind == "raw_length":
        s["raw_length"] = max(0, s["raw_length"] + args[0])
    elif s["codec"] in BYTE_CODECS:  # codes-codec blobs have no decoded bytes of their own
        try:
            raw = decompress(blobs[index], s["codec"], s["raw_length"])
        except ArtifactError:  # an earlier edit damaged it: leave it damaged
            return
        if raw:
            raw = _flip(raw, *args) if kind == "decoded_flip" else bytes([args[0]]) * len(raw)
        blobs[index] = compress(raw, s["codec"])


@given(which=st.integers(0, 100), edits=st.lists(st.tuples(st.integers(0, 100), _payload_ops), min_size=1,
                                                  max_size=3))
@_settings("payload")
def test_resealed_payloads(corpus, which, edits):
    folder, originals = corpus
    _, manifest, blobs = split(originals[which % len(originals)])
    for index, op in edits:
        _apply_payload_op(manifest, blobs, index % len(blobs), op)
    check(folder, seal(manifest, blobs), "payload")


# --------------------------------------------------------------------------------------------- tier 3: manifests

_manifest_ops = st.one_of(
    st.tuples(st.just("replace"), st.integers(0, 1 << 20), st.sampled_from(JUNK)),
    st.tuples(st.just("nudge"), st.integers(0, 1 << 20), st.integers(-3, 3)),  # an int off by a little
    st.tuples(st.just("delete"), st.integers(0, 1 << 20)),
    st.tuples(st.just("add_key"), st.integers(0, 1 << 20), st.sampled_from(["zz", "name", "offset", "codec"])),
    st.tuples(st.just("duplicate"), st.integers(0, 1 << 20)),  # a list element repeated
    st.tuples(st.just("swap"), st.integers(0, 1 << 20), st.integers(0, 100)),  # two list elements exchanged
)


def _apply_manifest_op(manifest: dict, op) -> None:
    slots = _slots(manifest, [])
    kind, where, *args = op
    node, key = slots[where % len(slots)]
    if kind == "nudge" and type(node[key]) is int:
        node[key] += args[0]
    elif kind == "delete":
        del node[key]
    elif kind == "add_key" and isinstance(node[key], dict):
        node[key][args[0]] = 0
    elif kind == "duplicate" and isinstance(node, list):
        node.insert(key, json.loads(json.dumps(node[key])))
    elif kind == "swap" and isinstance(node, list):
        other = args[0] % len(node)
        node[key], node[other] = node[other], node[key]
    else:  # "replace", and the operations that do not apply to this slot
        value = args[0] if kind == "replace" else JUNK[where % len(JUNK)]
        node[key] = json.loads(json.dumps(value))  # a fresh copy


@given(which=st.integers(0, 100), ops=st.lists(_manifest_ops, min_size=1, max_size=3),
       codec=st.sampled_from(["zlib", "none", "zstd", "lzma"]))  # brotli at quality 11 costs ms per case
@_settings("manifest")
def test_forged_manifests(corpus, which, ops, codec):
    folder, originals = corpus
    _, manifest, blobs = split(originals[which % len(originals)])
    for op in ops:
        _apply_manifest_op(manifest, op)
    check(folder, seal(manifest, blobs, codec, fix_sections=False), "manifest")


@given(which=st.integers(0, 100), where=st.integers(0, 1 << 20))
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_unknown_keys_are_rejected(corpus, which, where):
    """Exact key sets: one extra key in any object of the manifest (meta aside) makes the file invalid."""
    folder, originals = corpus
    _, manifest, blobs = split(originals[which % len(originals)])
    objects = [manifest] + [node[key] for node, key in _slots(manifest, []) if isinstance(node[key], dict)]
    objects[where % len(objects)]["surplus"] = 0
    path = folder / "extra.gqa"
    path.write_bytes(seal(manifest, blobs, fix_sections=False))
    with pytest.raises(ArtifactError, match="keys"):
        read_artifact(path)


# --------------------------------------------------------------------------------------------- tier 4: consistent lies

_dims = st.one_of(st.integers(0, 9), st.sampled_from([2**10, 2**20, 2**28]))
_consistent_ops = st.one_of(
    st.tuples(st.just("reshape"), st.integers(0, 100), st.lists(_dims, min_size=0, max_size=4)),
    st.tuples(st.just("bits"), st.integers(0, 100), st.integers(2, 8)),
    st.tuples(st.just("relayout"), st.integers(0, 100), st.sampled_from(LAYOUTS)),
    st.tuples(st.just("lqer"), st.integers(0, 100), st.sampled_from(["rank", "group", "a_bits", "b_bits"]),
              st.sampled_from([0, 1, 2, 3, 5, 8, 64, 2**20])),
    st.tuples(st.just("rotate"), st.integers(0, 100), st.sampled_from(["kind", "block", "seed"]),
              st.sampled_from([0, 1, 2, 3, 4, 8, 16, 2**31, -1, "hadamard", None])),
    st.tuples(st.just("dtype"), st.integers(0, 100), st.sampled_from(["float16", "bfloat16", "float32", "float64",
                                                                      "int64", "int32", "int16", "int8", "uint8",
                                                                      "bool"])),
)
_RANS_MAX_NUMEL = 1024  # larger forged rANS shapes are test_forged_rans_shape_decodes_cheaply's subject


def _fit_codes(sections: list, index: int, shape: list, bits: int) -> bool:
    """Make the codes section's raw_length agree with shape and bits; False when its codec/layout cannot."""
    s = sections[index]
    numel = math.prod(shape)
    if s["codec"] in CODES_CODECS:
        if numel > _RANS_MAX_NUMEL:
            return False
        s["raw_length"] = numel
    else:
        try:
            s["raw_length"] = packed_length(numel, bits, s["layout"])
        except ValueError:  # the layout cannot hold these bits (nibble above int4): no length to agree with
            return False
    return True


def _apply_consistent_op(manifest: dict, op) -> None:
    tensors, sections = manifest["tensors"], manifest["sections"]
    kind, which, *args = op
    quant = [t for t in tensors if t["kind"] == "quant"]
    t = quant[which % len(quant)] if kind != "dtype" else tensors[which % len(tensors)]
    if kind == "reshape":
        if t["codes"] is not None and _fit_codes(sections, t["codes"], args[0], t["bits"]):
            t["shape"] = args[0]
    elif kind == "bits":
        if _fit_codes(sections, t["codes"], t["shape"], args[0]):
            t["bits"], t["scheme"] = args[0], f"int{args[0]}"
    elif kind == "relayout":
        s = sections[t["codes"]]
        if s["codec"] in BYTE_CODECS:
            s["layout"] = args[0]
            _fit_codes(sections, t["codes"], t["shape"], t["bits"])
    elif kind == "lqer":
        if t["lqer"] is not None:
            t["lqer"][args[0]] = args[1]
    elif kind == "rotate":
        t.setdefault("rotate", {"kind": "hadamard", "block": 2, "seed": 0})[args[0]] = args[1]
    elif t["kind"] == "float":
        t["data"]["dtype"] = args[0]
        t["dtype"] = args[0] if t["scheme"] == "raw" else t["dtype"]


@given(which=st.integers(0, 100), ops=st.lists(_consistent_ops, min_size=1, max_size=3))
@_settings("consistent")
def test_consistent_forgeries(corpus, which, ops):
    folder, originals = corpus
    _, manifest, blobs = split(originals[which % len(originals)])
    for op in ops:
        _apply_consistent_op(manifest, op)
    check(folder, seal(manifest, blobs), "consistent")


def test_every_tier_ran_its_cases():
    """The tiers above ran (at least) their example counts: over 10,000 cases in all."""
    ran = {tier: n for tier, n in _counts.items() if n}
    assert all(ran.get(tier, 0) >= n for tier, n in EXAMPLES.items() if tier in ran), ran
    if len(ran) == len(EXAMPLES):
        assert sum(ran.values()) >= 10_000


# --------------------------------------------------------------------------------------------- known weak spots


def _rans_corpus_entry(corpus) -> tuple[Path, bytes]:
    folder, blobs = corpus
    return folder, next(b for b in blobs if b"codec-rans" in decompress(*_manifest_slice(b)))


def _manifest_slice(data: bytes) -> tuple[bytes, str, int]:
    n = data[6]
    m_len, m_raw, _ = struct.unpack_from("<III", data, 7 + n)
    return data[19 + n:19 + n + m_len], data[7:7 + n].decode(), m_raw


def test_forged_rans_shape_decodes_cheaply(corpus):
    """A valid rANS stream of constant codes is ~4 bytes per lane whatever the element count, so a tiny file may
    declare MAX_NUMEL elements. Decoding must then cost about the output (1 byte per element), not 57x it."""
    folder, data = _rans_corpus_entry(corpus)
    _, manifest, blobs = split(data)
    t = next(t for t in manifest["tensors"] if t["kind"] == "quant" and manifest["sections"][t["codes"]]["codec"]
             == "rans")
    numel = 1 << 21
    lanes = min(1024, -(-numel // 8192))
    # version 1, crc32 of the body; body: kind order-0, table (lo 0, span 0, precision 16, frequency 2^16), then every lane at 2^16
    body = bytes([2, 0, 0, 16, 0x80, 0x80, 0x04]) + (1 << 16).to_bytes(4, "little") * lanes
    blobs[t["codes"]] = bytes([1]) + zlib.crc32(body).to_bytes(4, "little") + body
    manifest["sections"][t["codes"]]["raw_length"] = numel
    t["shape"], t["lqer"] = [1, numel], None
    path = folder / "rans-bomb.gqa"
    path.write_bytes(seal(manifest, blobs))
    tracemalloc.start()
    try:
        art = read_artifact(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert art.tensors[t["name"]].codes.numel() == numel
    assert peak < 8 * numel, f"decoding {numel} codes peaked at {peak / numel:.0f} bytes per element"


def test_lqer_huge_group_dequantizes_cheaply(corpus):
    """A group far larger than B is valid (one scale for all of B), so a tiny file may declare group 2^28. Loading it
    must give W = q*s + A @ (B's codes times that one scale) at about the cost of the factors, not of the group.
    torch allocates where tracemalloc does not look, so the peak resident set is measured instead: writing 5 to
    /proc/self/clear_refs resets it to the current resident set."""
    folder, blobs = corpus
    _, manifest, sections = split(blobs[0])
    t = next(t for t in manifest["tensors"] if t["kind"] == "quant" and t["lqer"])
    t["lqer"]["group"] = 2**28  # valid: ceil(rank * cols / group) = 1 scale, which the section holds
    path = folder / "group-bomb.gqa"
    path.write_bytes(seal(manifest, sections))
    stored = read_artifact(path).tensors[t["name"]]
    Path("/proc/self/clear_refs").write_text("5")
    resident = _process_bytes("VmHWM")
    loaded = load_artifact(path)[t["name"]]
    peak = _process_bytes("VmHWM") - resident
    lq = stored.lqer
    b = lq.b_codes.to(torch.float32) * lq.b_scales.to(torch.float32)[0]
    expected = stored.codes.to(torch.float32) * stored.scales.to(torch.float32)[:, None] + lq.a() @ b
    assert torch.equal(loaded, expected.to(loaded.dtype))
    # ~2 MiB here; one float per element of the group would be 1 GiB
    assert peak < 32 << 20, f"dequantizing a {stored.codes.numel()}-element tensor peaked at {peak >> 20} MiB"


def _salient_artifacts(folder: Path) -> tuple[bytes, bytes]:
    """An artifact whose [4, 128] int4 tensor keeps group 1 of 64 columns at int8, and the same tensor without salient
    groups but nonzero codes in those columns: same codes layout and section sizes, so its codes section can be
    swapped in."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-7, 8, (4, 128), generator=g, dtype=torch.int8)
    sal = SalientColumns((1,), 64, torch.randint(-127, 128, (4, 64), generator=g, dtype=torch.int8),
                         torch.full((4,), 0.01).half(), 8)
    qt = QuantizedTensor(codes.index_fill(-1, sal.columns(), 0), torch.full((4,), 0.1).half(), 4, salient=sal)
    out = []
    for name, value in (("good", qt), ("main", QuantizedTensor(codes, qt.scales, 4))):
        write_artifact(folder / f"{name}.gqa", {"w": value}, None, codecs=["none"], layouts=["int8"])
        out.append((folder / f"{name}.gqa").read_bytes())
    return out[0], out[1]


@pytest.mark.parametrize("forge, message", [
    (lambda s: s.update(group=0), "group"),
    (lambda s: s.update(group=True), "group"),
    (lambda s: s.update(group=48), "does not divide"),
    (lambda s: s.update(groups=[]), "groups"),
    (lambda s: s.update(groups=[1, 1]), "groups"),
    (lambda s: s.update(groups=[2]), "groups"),  # 128 columns hold groups 0 and 1
    (lambda s: s.update(groups=[-1]), "groups"),
    (lambda s: s.update(groups=[1.0]), "groups"),
    (lambda s: s.update(groups=[0, 1]), "raw_length"),  # twice the columns the codes section holds
    (lambda s: s.update(bits=4), "not above"),
    (lambda s: s.update(bits=9), "outside"),
    (lambda s: s.update(codes=s["scales"]["section"]), "codes section"),
    (lambda s: s["scales"].update(offset=10**6), "exceed"),
    (lambda s: s.update(extra=1), "keys"),
    (lambda s: s.pop("scales"), "keys"),
])
def test_forged_salient_layouts_are_refused(tmp_path, forge, message):
    good, _ = _salient_artifacts(tmp_path)
    codec, manifest, blobs = split(good)
    forge(manifest["tensors"][0]["salient"])
    path = tmp_path / "forged.gqa"
    path.write_bytes(seal(manifest, blobs, codec))
    with pytest.raises(ArtifactError, match=message):
        read_artifact(path)


def test_salient_entry_is_an_object_on_quantized_tensors_only(tmp_path):
    good, _ = _salient_artifacts(tmp_path)
    codec, manifest, blobs = split(good)
    manifest["tensors"][0]["salient"] = None  # "no salient groups" is the absent key: one meaning per artifact
    (tmp_path / "null.gqa").write_bytes(seal(manifest, blobs, codec))
    with pytest.raises(ArtifactError, match="expected an object"):
        read_artifact(tmp_path / "null.gqa")
    write_artifact(tmp_path / "float.gqa", {"f": torch.ones(3)}, None)
    codec, manifest, blobs = split((tmp_path / "float.gqa").read_bytes())
    manifest["tensors"][0]["salient"] = {}
    (tmp_path / "float-forged.gqa").write_bytes(seal(manifest, blobs, codec))
    with pytest.raises(ArtifactError, match="keys"):
        read_artifact(tmp_path / "float-forged.gqa")


@pytest.mark.parametrize("packed", [False, True])
def test_nonzero_main_codes_in_salient_columns_are_refused(tmp_path, packed):
    good, main = _salient_artifacts(tmp_path)
    codec, manifest, blobs = split(good)
    _, main_manifest, main_blobs = split(main)
    index = manifest["tensors"][0]["codes"]
    blobs[index] = main_blobs[main_manifest["tensors"][0]["codes"]]
    path = tmp_path / "two-meanings.gqa"
    path.write_bytes(seal(manifest, blobs, codec))
    assert read_artifact(tmp_path / "good.gqa", packed=packed).tensors["w"] is not None
    with pytest.raises(ArtifactError, match="salient columns"):
        read_artifact(path, packed=packed)
