import json
import random
import struct
import zlib

import numpy as np
import pytest
import torch

from golfquant import artifact
from golfquant.artifact import (MAGIC, MAX_SEED, artifact_sizes, encode_artifact, float_tensor_bytes, load_artifact,
                                read_artifact, write_artifact)
from golfquant.codec import BYTE_CODECS, CODES_CODECS, compress, decompress, register_codes_codec
from golfquant.errors import ArtifactError, OptionError
from golfquant.pack import layouts_for, pack_codes
from golfquant.plan import PlanOptions, make_plan
from golfquant.quant.qtensor import LowRankFactors, QuantizedTensor, lqer_b_scale_count
from golfquant.quant.rtn import quantize_rtn
from kernels import PackedWeight, Rotation


def state_dict():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    return {
        "tok_emb.weight": r(48, 32).bfloat16(),
        "skip_weights": r(2, 32),
        "blocks.0.attn_scale": torch.ones(32),
        "blocks.0.attn.c_q.weight": r(32, 32),
        "blocks.0.mlp.fc.weight": r(64, 32),
        "blocks.0.mlp.proj.weight": r(4, 8),
        "qo_bank": r(2, 16, 32),
        "bigram.proj.weight": r(32, 32),
        "big_vector": r(300),
        "steps": torch.tensor([7, 8], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


PLAN_OPTS = PlanOptions(mlp="int5", attn="int6", embed="int8", other="int3", float_max_numel=100,
                        rules=[("big_vector", "bf16")])


def quantize(sd, plan):
    out = {n: quantize_rtn(sd[n], p.bits) if p.bits else sd[n] for n, p in plan.items()}
    # one LQER-corrected tensor, with factors built by hand
    g = torch.Generator().manual_seed(1)
    out["blocks.0.attn.c_q.weight"].lqer = LowRankFactors(
        a_codes=torch.randint(-1, 2, (32, 2), generator=g, dtype=torch.int8), a_scale=torch.tensor(0.01).half(),
        a_bits=2, b_codes=torch.randint(-7, 8, (2, 32), generator=g, dtype=torch.int8),
        b_scales=(torch.rand(2, generator=g) * 0.01).half(), b_bits=4, group=48)
    # two rotated tensors: the LQER one (the inverse comes after A @ B) and a bank (one rotation for every slice)
    out["blocks.0.attn.c_q.weight"].rotation = Rotation(16, 5)
    out["qo_bank"].rotation = Rotation(32, MAX_SEED)
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    sd = state_dict()
    plan = make_plan(sd, PLAN_OPTS)
    tensors = quantize(sd, plan)
    path = tmp_path_factory.mktemp("art") / "model.gqa"
    info = write_artifact(path, tensors, plan, {"method": "rtn", "damp": {"x": 0.01}})
    return sd, plan, tensors, path, info


def test_round_trip_is_bit_exact(written):
    sd, plan, tensors, path, _ = written
    art = read_artifact(path)
    assert list(art.tensors) == list(tensors)
    assert art.manifest["meta"] == {"method": "rtn", "damp": {"x": 0.01}}
    for name, value in tensors.items():
        back = art.tensors[name]
        if isinstance(value, QuantizedTensor):
            assert back.bits == value.bits
            assert torch.equal(back.codes, value.codes) and torch.equal(back.scales, value.scales)
        else:
            assert back.dtype == {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}.get(
                plan[name].scheme, value.dtype)
            assert torch.equal(back, value.to(back.dtype))
    lq, back = tensors["blocks.0.attn.c_q.weight"].lqer, art.tensors["blocks.0.attn.c_q.weight"].lqer
    for field in ("a_codes", "a_scale", "b_codes", "b_scales"):
        assert torch.equal(getattr(lq, field), getattr(back, field))
    assert (back.a_bits, back.b_bits, back.group) == (2, 4, 48)
    assert {n: t.rotation for n, t in art.tensors.items() if isinstance(t, QuantizedTensor) and t.rotation} \
        == {"blocks.0.attn.c_q.weight": (16, 5), "qo_bank": (32, MAX_SEED)}
    assert "rotate" not in next(t for t in art.manifest["tensors"] if t["name"] == "tok_emb.weight")


def test_passthrough_dtypes(written):
    sd, plan, _, path, _ = written
    stored = read_artifact(path).tensors
    assert stored["skip_weights"].dtype == torch.float32  # control: fp32
    assert stored["blocks.0.mlp.proj.weight"].dtype == torch.float16  # small: fp16
    assert stored["big_vector"].dtype == torch.bfloat16  # the plan says bf16
    assert stored["steps"].dtype == torch.int64 and stored["mask"].dtype == torch.bool
    loaded = load_artifact(path)
    for name, t in sd.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
    assert torch.equal(loaded["skip_weights"], sd["skip_weights"])
    assert torch.equal(loaded["mask"], sd["mask"]) and torch.equal(loaded["steps"], sd["steps"])
    as_bf16 = load_artifact(path, dtype=torch.bfloat16)
    assert as_bf16["blocks.0.mlp.fc.weight"].dtype == torch.bfloat16 and as_bf16["steps"].dtype == torch.int64


def test_load_dequantizes_and_keeps_banks(written):
    _, _, tensors, path, _ = written
    loaded = load_artifact(path)
    for name in ("blocks.0.attn.c_q.weight", "qo_bank", "tok_emb.weight"):
        assert torch.equal(loaded[name], tensors[name].dequantize(loaded[name].dtype)), name
    assert loaded["qo_bank"].shape == (2, 16, 32)
    raw = load_artifact(path, dequantize=False)
    assert isinstance(raw["qo_bank"], QuantizedTensor) and raw["qo_bank"].scales.shape == (2, 16)
    assert torch.equal(raw["qo_bank"].codes, tensors["qo_bank"].codes)
    assert raw["big_vector"].dtype == torch.float32  # passthrough back in its original dtype


def test_packed_read_gives_kernel_weights(written):
    _, _, tensors, path, _ = written
    packed = read_artifact(path, packed=True).tensors
    for name in ("blocks.0.attn.c_q.weight", "qo_bank", "tok_emb.weight"):
        weight = packed[name]
        assert isinstance(weight, PackedWeight) and weight.shape == tuple(tensors[name].shape), name
        assert torch.equal(weight.dequantize(torch.float32, backend="torch"), tensors[name].dequantize()), name
    lq = tensors["blocks.0.attn.c_q.weight"].lqer
    a, b = packed["blocks.0.attn.c_q.weight"].lqer
    assert torch.equal(a, lq.a()) and torch.equal(b, lq.b())
    assert packed["qo_bank"].lqer is None and torch.equal(packed["qo_bank"].scales, tensors["qo_bank"].scales)
    assert packed["qo_bank"].rotation == (32, MAX_SEED) and packed["tok_emb.weight"].rotation is None


def test_lqer_b_scale_count_is_an_exact_ceiling():
    assert [lqer_b_scale_count(2, 32, g) for g in (48, 64, 65, 1)] == [2, 1, 1, 64]
    assert lqer_b_scale_count(1, 2**53 + 1, 2) == 2**52 + 1  # float division would round this down


def test_deterministic(written, tmp_path):
    _, plan, tensors, path, _ = written
    write_artifact(tmp_path / "again.gqa", tensors, plan, {"method": "rtn", "damp": {"x": 0.01}})
    assert (tmp_path / "again.gqa").read_bytes() == path.read_bytes()


def test_codec_selection_keeps_the_smallest(written):
    _, _, tensors, path, info = written
    by_name = {s.name: s for s in info.sections}
    for name in ("blocks.0.mlp.fc.weight", "qo_bank", "tok_emb.weight"):
        qt = tensors[name]
        sizes = [len(compress(pack_codes(qt.codes, qt.bits, layout), codec))
                 for layout in layouts_for(qt.bits, qt.codes.dim()) for codec in BYTE_CODECS]
        sizes += [len(c.encode(qt.codes.numpy(), qt.bits)) for c in CODES_CODECS.values()]
        assert by_name[f"codes:{name}"].length == min(sizes)


def test_codec_and_layout_restriction(written, tmp_path):
    _, plan, tensors, _, _ = written
    info = write_artifact(tmp_path / "z.gqa", tensors, plan, {}, codecs=["zlib"], layouts=["int8"])
    assert {s.codec for s in info.sections} == {"zlib"}
    assert {s.layout for s in info.sections if s.kind == "codes"} == {"int8"}
    with pytest.raises(OptionError, match="unknown codec"):
        write_artifact(tmp_path / "bad.gqa", tensors, plan, {}, codecs=["lz4"])
    with pytest.raises(OptionError, match="unknown layout"):
        write_artifact(tmp_path / "bad.gqa", tensors, plan, {}, layouts=["int4"])
    assert not (tmp_path / "bad.gqa").exists()


class ZerosCodec:
    """A codes codec that stores an all-zero tensor in 0 bytes (and anything else as plain int8)."""

    def encode(self, codes, bits):
        return b"" if not codes.any() else b"\1" + codes.tobytes()

    def decode(self, blob, shape, bits):
        if blob == b"":
            return np.zeros(shape, dtype=np.int8)
        if len(blob) != 1 + int(np.prod(shape)):
            raise ArtifactError("zeros codec: wrong length")
        return np.frombuffer(blob[1:], dtype=np.int8).reshape(shape).copy()


def test_codes_codec_competes_with_byte_codecs(tmp_path):
    register_codes_codec("test-zeros", ZerosCodec())
    try:
        tensors = {"a.weight": QuantizedTensor(torch.zeros(8, 16, dtype=torch.int8), torch.ones(8).half(), 4),
                   "b.weight": quantize_rtn(torch.randn(8, 16), 4)}
        info = write_artifact(tmp_path / "c.gqa", tensors, None, {})
        sections = {s.name: s for s in info.sections}
        assert (sections["codes:a.weight"].codec, sections["codes:a.weight"].layout) == ("test-zeros", None)
        assert sections["codes:b.weight"].codec != "test-zeros"
        back = read_artifact(tmp_path / "c.gqa").tensors
        assert torch.equal(back["a.weight"].codes, tensors["a.weight"].codes)
    finally:
        CODES_CODECS.pop("test-zeros")
    with pytest.raises(ArtifactError, match="unknown value 'test-zeros'"):  # a reader without that codec
        read_artifact(tmp_path / "c.gqa")


def test_roles_or_no_plan(tmp_path):
    tensors = {"blocks.0.mlp.fc.weight": quantize_rtn(torch.randn(4, 8), 6), "x": torch.randn(3).half()}
    write_artifact(tmp_path / "r.gqa", tensors, {"blocks.0.mlp.fc.weight": "mlp", "x": "other"}, {})
    entries = {t["name"]: t for t in read_artifact(tmp_path / "r.gqa").manifest["tensors"]}
    assert (entries["blocks.0.mlp.fc.weight"]["role"], entries["blocks.0.mlp.fc.weight"]["scheme"]) == ("mlp", "int6")
    assert (entries["x"]["scheme"], entries["x"]["dtype"]) == ("fp16", "float16")
    write_artifact(tmp_path / "n.gqa", tensors, None, {})
    assert read_artifact(tmp_path / "n.gqa").manifest["tensors"][0]["role"] == "mlp"
    write_artifact(tmp_path / "e.gqa", {}, None, {})
    assert read_artifact(tmp_path / "e.gqa").tensors == {}


def test_writer_rejects_inconsistent_input(written, tmp_path):
    _, plan, tensors, _, _ = written
    wrong = dict(tensors, **{"qo_bank": torch.zeros(2, 16, 32)})
    with pytest.raises(ValueError, match="float tensor but its plan scheme is int6"):
        write_artifact(tmp_path / "w.gqa", wrong, plan, {})
    with pytest.raises(ValueError, match="no entry"):
        write_artifact(tmp_path / "w.gqa", dict(tensors, extra=torch.zeros(1)), plan, {})
    with pytest.raises(OptionError, match="JSON"):
        write_artifact(tmp_path / "w.gqa", tensors, plan, {"bad": float("nan")})
    assert not (tmp_path / "w.gqa").exists()


def test_size_report_accounts_for_every_byte(written):
    _, _, tensors, path, info = written
    report = artifact_sizes(path)
    assert report == info
    size = path.stat().st_size
    assert report.total_bytes == size
    assert report.header_bytes + report.manifest_bytes + report.unattributed_bytes \
        + sum(t.total for t in report.tensors) == size
    assert report.unattributed_bytes == 0
    by_section = {s.name: s for s in report.sections}
    rows = {t.name: t for t in report.tensors}
    assert rows["qo_bank"].codes_bytes == by_section["codes:qo_bank"].length
    assert sum(t.scales_bytes for t in report.tensors) + rows["blocks.0.attn.c_q.weight"].lqer_bytes \
        - by_section["lqer.a:blocks.0.attn.c_q.weight"].length - by_section["lqer.b:blocks.0.attn.c_q.weight"].length \
        == by_section["scales"].length
    assert sum(t.data_bytes for t in report.tensors) == sum(s.length for s in report.sections if s.kind == "data")
    assert rows["steps"].numel == 2 and rows["tok_emb.weight"].bits_per_weight > 0
    assert rows["qo_bank"].rotation == (32, MAX_SEED) and rows["tok_emb.weight"].rotation is None


# ------------------------------------------------------------------------------------------- untrusted input


def split(blob):
    """(manifest dict, section region) of an artifact, parsed as docs/artifact.md describes."""
    n = blob[6]
    codec = blob[7 : 7 + n].decode()
    m_len, m_raw, _ = struct.unpack_from("<III", blob, 7 + n)
    start = 19 + n
    manifest = json.loads(decompress(blob[start : start + m_len], codec, m_raw))
    return manifest, blob[start + m_len :]


def join(manifest, region):
    raw = json.dumps(manifest).encode()
    m = zlib.compress(raw)
    head = MAGIC + struct.pack("<HB", 1, 4) + b"zlib" + struct.pack("<III", len(m), len(raw), zlib.crc32(m))
    return head + m + region


def expect_artifact_error(tmp_path, blob):
    path = tmp_path / "fuzz.gqa"
    path.write_bytes(blob)
    try:
        read_artifact(path)
    except ArtifactError:
        return True
    return False


def test_rebuilt_container_is_accepted(written, tmp_path):
    _, _, _, path, _ = written
    manifest, region = split(path.read_bytes())
    assert not expect_artifact_error(tmp_path, join(manifest, region))  # the test's encoder matches the format


def test_damaged_files_raise_only_artifact_error(written, tmp_path):
    _, _, _, path, _ = written
    blob = path.read_bytes()
    rng = random.Random(0)
    cases = [blob[:cut] for cut in sorted(rng.sample(range(len(blob)), 150))]
    for pos in rng.sample(range(len(blob)), 200):
        flipped = bytearray(blob)
        flipped[pos] ^= 1 << rng.randrange(8)
        cases.append(bytes(flipped))
    cases += [blob + bytes(rng.randrange(256) for _ in range(k)) for k in (1, 2, 7, 100)]
    cases += [b"", MAGIC, b"\0" + blob, blob.replace(MAGIC, b"GQA2", 1)]
    for i, case in enumerate(cases):
        assert expect_artifact_error(tmp_path, case), f"case {i} was accepted"


def test_forged_manifests_raise_only_artifact_error(written, tmp_path):
    """Mutate manifest fields (with valid checksums around them): only ArtifactError may come out."""
    _, _, _, path, _ = written
    manifest, region = split(path.read_bytes())
    values = [None, True, -1, 0, 1, 7, 2**31, 2**62, 1.5, "", "x", "int8", "lzma", "codes", [], [1 << 40, 1 << 40],
              {}, {"section": 0, "offset": 0}]
    paths = []

    def walk(node, trail):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, child in items:
            paths.append(trail + [key])
            walk(child, trail + [key])

    walk({k: v for k, v in manifest.items() if k != "meta"}, [])
    rng = random.Random(1)
    accepted = 0
    for _ in range(300):
        forged = json.loads(json.dumps(manifest))
        trail = rng.choice(paths)
        node = forged
        for key in trail[:-1]:
            node = node[key]
        if rng.random() < 0.1 and isinstance(node, dict):
            del node[trail[-1]]
        else:
            node[trail[-1]] = rng.choice(values)
        accepted += not expect_artifact_error(tmp_path, join(forged, region))
    assert accepted < 30  # a few mutations are harmless (e.g. a section renamed); nothing else may escape


def test_targeted_forgeries(written, tmp_path):
    _, _, _, path, _ = written
    manifest, region = split(path.read_bytes())
    codes_index = next(i for i, s in enumerate(manifest["sections"]) if s["name"] == "codes:qo_bank")

    def forge(change):
        forged = json.loads(json.dumps(manifest))
        change(forged)
        return forged

    def tensor(m, name):
        return next(t for t in m["tensors"] if t["name"] == name)

    def replace_section(index, payload, raw_length, codec="zlib"):
        m = forge(lambda m: None)
        old = m["sections"][index]
        new_region = region[: old["offset"]] + payload + region[old["offset"] + old["length"] :]
        delta = len(payload) - old["length"]
        old.update(length=len(payload), crc32=zlib.crc32(payload), raw_length=raw_length, codec=codec, layout="int8")
        for s in m["sections"][index + 1 :]:
            s["offset"] += delta
        return m, new_region

    cases = {
        "shape": (forge(lambda m: tensor(m, "qo_bank").update(shape=[2, 16, 33])), region),
        "huge shape": (forge(lambda m: tensor(m, "qo_bank").update(shape=[1 << 27, 1 << 27])), region),
        "bits": (forge(lambda m: tensor(m, "qo_bank").update(bits=9)), region),
        "bool bits": (forge(lambda m: tensor(m, "steps").update(bits=True)), region),
        "dtype": (forge(lambda m: tensor(m, "qo_bank").update(dtype="complex64")), region),
        "stored dtype": (forge(lambda m: tensor(m, "skip_weights")["data"].update(dtype="float16")), region),
        "duplicate": (forge(lambda m: m["tensors"].append(m["tensors"][0])), region),
        "layout": (forge(lambda m: m["sections"][codes_index].update(layout="nibble")), region),
        "codec": (forge(lambda m: m["sections"][codes_index].update(codec="lz4")), region),
        "crc": (forge(lambda m: m["sections"][codes_index].update(crc32=0)), region),
        "raw_length": (forge(lambda m: m["sections"][-1].update(raw_length=1 << 31)), region),
        "extra key": (forge(lambda m: m.update(extra=1)), region),
        "meta": (forge(lambda m: m.update(meta=[])), region),
        "bomb": replace_section(codes_index, zlib.compress(bytes(1 << 22)), 1024),
        "out of range codes": replace_section(codes_index, zlib.compress(bytes([0x80]) * 1024), 1024),
    }
    for what, (m, reg) in cases.items():
        assert expect_artifact_error(tmp_path, join(m, reg)), what
    assert expect_artifact_error(tmp_path, join(manifest, region[:-1]))
    assert expect_artifact_error(tmp_path, join(manifest, region + b"\0"))
    with pytest.raises(ArtifactError, match="cannot be read"):
        read_artifact(tmp_path / "missing.gqa")


ROTATION_FORGERIES = {  # one case per check of the reader (the tensor is 32 columns wide)
    "unknown kind": {"kind": "givens"},
    "kind not a string": {"kind": 1},
    "block not a power of two": {"block": 12},
    "block above the columns": {"block": 64},
    "block below 2": {"block": 1},
    "block zero": {"block": 0},
    "block far above the columns": {"block": 1 << 40},
    "block not an int": {"block": 16.0},
    "block a bool": {"block": True},
    "seed negative": {"seed": -1},
    "seed above the range": {"seed": MAX_SEED + 1},
    "seed not an int": {"seed": "5"},
    "seed a bool": {"seed": False},
    "extra key": {"axis": -1},
}


@pytest.mark.parametrize("what", [*ROTATION_FORGERIES, "missing key", "null", "not an object", "on a float",
                                  "block not dividing the columns"])
def test_rotation_forgeries_are_refused(written, tmp_path, what):
    _, _, _, path, _ = written
    manifest, region = split(path.read_bytes())
    t = next(t for t in manifest["tensors"] if t["name"] == "blocks.0.attn.c_q.weight")
    if what in ROTATION_FORGERIES:
        t["rotate"].update(ROTATION_FORGERIES[what])
    elif what == "missing key":
        del t["rotate"]["seed"]
    elif what == "on a float":
        next(t for t in manifest["tensors"] if t["kind"] == "float")["rotate"] = t["rotate"]
    elif what == "block not dividing the columns":  # tok_emb [48, 32] read as [32, 48]: the same codes bytes
        emb = next(t for t in manifest["tensors"] if t["name"] == "tok_emb.weight")
        emb.update(shape=[32, 48], rotate={"kind": "hadamard", "block": 32, "seed": 0})
    else:
        t["rotate"] = None if what == "null" else [16, 5]
    forged = tmp_path / "forged.gqa"
    forged.write_bytes(join(manifest, region))
    with pytest.raises(ArtifactError, match=r"\.rotate|has keys") as e:  # refused by the rotation's own check
        read_artifact(forged)
    assert what != "block not dividing the columns" or "dividing" in str(e.value)


def test_writer_refuses_a_rotation_that_does_not_fit(written, tmp_path):
    _, plan, tensors, _, _ = written
    for rotation in (Rotation(64, 0), Rotation(12, 0), Rotation(16, -1)):
        bad = dict(tensors, qo_bank=QuantizedTensor(tensors["qo_bank"].codes, tensors["qo_bank"].scales, 6,
                                                    rotation=rotation))
        with pytest.raises(ValueError, match="qo_bank"):
            write_artifact(tmp_path / "w.gqa", bad, plan, {})


def test_rans_sections_decode_together_and_a_damaged_one_is_named(tmp_path, monkeypatch):
    """Every rANS section's lanes are decoded in one lockstep (golfquant.codec.rans.decode_codes_many); damage
    behind valid checksums is still found, and the error names the tensor and the section."""
    from golfquant.codec import rans

    g = torch.Generator().manual_seed(3)
    tensors = {f"blocks.{i}.mlp.fc.weight": quantize_rtn(torch.randn(60 + 7 * i, 96, generator=g), 3 + i)
               for i in range(4)}
    tensors["blocks.0.mlp.fc.weight"].lqer = LowRankFactors(
        a_codes=torch.randint(-1, 2, (60, 2), generator=g, dtype=torch.int8), a_scale=torch.tensor(0.01).half(),
        a_bits=2, b_codes=torch.randint(-7, 8, (2, 96), generator=g, dtype=torch.int8),
        b_scales=(torch.rand(48, generator=g) * 0.01).half(), b_bits=4, group=4)
    path = tmp_path / "r.gqa"
    write_artifact(path, tensors, None, codecs=["rans", "zlib"], layouts=[])
    manifest, region = split(path.read_bytes())
    assert [s["codec"] for s in manifest["sections"] if s["kind"] == "codes"] == ["rans"] * 6

    groups = []
    decode_group = rans._decode_group
    monkeypatch.setattr(rans, "_decode_group", lambda streams: groups.append(len(streams)) or decode_group(streams))
    art = read_artifact(path)
    assert len(groups) == 1 and groups[0] >= 6  # one lockstep for all six sections
    for name, qt in tensors.items():
        assert torch.equal(art.tensors[name].codes, qt.codes)
    lq = art.tensors["blocks.0.mlp.fc.weight"].lqer
    assert torch.equal(lq.a_codes, tensors["blocks.0.mlp.fc.weight"].lqer.a_codes)
    assert torch.equal(lq.b_codes, tensors["blocks.0.mlp.fc.weight"].lqer.b_codes)
    packed = read_artifact(path, packed=True).tensors["blocks.3.mlp.fc.weight"]
    codes = tensors["blocks.3.mlp.fc.weight"].codes
    assert packed.layout == "int8" and torch.equal(packed.packed, codes.view(torch.uint8).reshape(-1))

    index = next(i for i, s in enumerate(manifest["sections"]) if s["name"] == "codes:blocks.2.mlp.fc.weight")
    s = manifest["sections"][index]
    blob = region[s["offset"]:s["offset"] + s["length"]]
    body = blob[5:-2]  # one word short, behind a valid rANS CRC and section checksum
    forged = blob[:1] + zlib.crc32(body).to_bytes(4, "little") + body
    new_region = region[:s["offset"]] + forged + region[s["offset"] + s["length"]:]
    s.update(length=len(forged), crc32=zlib.crc32(forged))
    for later in manifest["sections"][index + 1:]:
        later["offset"] -= 2
    damaged = tmp_path / "damaged.gqa"
    damaged.write_bytes(join(manifest, new_region))
    with pytest.raises(ArtifactError, match=rf"tensor 'blocks\.2\.mlp\.fc\.weight' sections\[{index}\]: rANS stream"):
        read_artifact(damaged)


def test_a_float_tensor_is_priced_at_what_the_writer_spends_on_it():
    t = torch.randn(4, 64).repeat(64, 1).half()  # repeated rows, as an embedding's rarely seen tokens
    info = encode_artifact({"w": t}, None).info
    (data,) = [s for s in info.sections if s.kind == "data"]
    assert float_tensor_bytes(t) == data.length < t.numel() * 2 / 8


def test_sections_are_encoded_once_while_remembered():
    # A budget search encodes mostly the same tensors again: the memo serves a section whose input and options it
    # has seen, and forgets the least recently used past its limit.
    made = []

    def make(blob):
        return lambda: made.append(blob) or artifact._Section("codes", "w", "zlib", None, 1, blob)

    memo = artifact._SectionMemo(limit=10)
    assert memo.get(b"a", ("x", 1), "w", make(b"1234")).blob == b"1234"
    again = memo.get(b"a", ("x", 1), "v", make(b"other"))  # remembered, under the name asked for
    assert (again.blob, again.name) == (b"1234", "v")
    assert memo.get(b"a", ("x", 2), "w", make(b"5678")).blob == b"5678"  # other options: encoded
    memo.get(b"b", ("x", 1), "w", make(b"9999"))  # 12 bytes kept > 10: the least recently used goes
    assert memo.get(b"a", ("x", 1), "w", make(b"again")).blob == b"again"
    assert made == [b"1234", b"5678", b"9999", b"again"] and memo.size <= 10


def test_the_price_of_a_float_tensor_serves_the_data_section_that_holds_only_it(monkeypatch):
    # The budget prices a float candidate by compressing it alone; the writer's data section of that tensor alone
    # is then the same section, not compressed again.
    t = torch.randn(300, 64, generator=torch.Generator().manual_seed(3)).half()
    price = float_tensor_bytes(t)
    monkeypatch.setattr(artifact, "compress", lambda *_: pytest.fail("the priced section was compressed again"))
    (data,) = [s for s in encode_artifact({"w": t}, None).info.sections if s.kind == "data"]
    assert data.length == price and data.name == "data:2"


def test_a_large_float_section_is_ranked_by_a_sample_that_sees_its_repeats():
    # Past 1 MiB the writer compresses only the pairs a sample ranks best: on near-identical rows (which the
    # order-0 size model cannot see) it must land near the best of the fast codecs compressing everything.
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(4, 512, generator=g).repeat(280, 1) + 1e-3 * torch.randn(1120, 512, generator=g)).half()
    raw = t.numpy().tobytes()
    assert len(raw) > artifact._SAMPLE_ABOVE
    (data,) = [s for s in encode_artifact({"w": t}, None).info.sections if s.kind == "data"]
    best = min(len(compress(artifact._apply_byte_layout(raw, layout), codec))
               for layout in ("bytes", "shuffle2") for codec in ("zlib", "zstd", "lzma"))
    assert data.length <= 1.03 * best < 0.8 * len(raw)
