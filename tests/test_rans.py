"""rANS codes coder (golfquant.codec.rans) and entropy bounds (golfquant.codec.entropy)."""
from __future__ import annotations

import zlib

import brotli
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from golfquant.codec import entropy, rans
from golfquant.codec.rans import decode_codes, encode_codes, estimate_encoded_bytes
from golfquant.errors import ArtifactError, OptionError


def qmax(bits):
    return 2 ** (bits - 1) - 1


def t_codes(rng, shape, bits, width, nu=4):
    r = qmax(bits)
    return np.clip(np.rint(rng.standard_t(nu, shape) * width), -r, r).astype(np.int8)


def roundtrip(q, bits):
    blob = encode_codes(q, bits)
    out = decode_codes(blob, q.shape, bits)
    assert out.dtype == np.int8 and out.shape == q.shape
    np.testing.assert_array_equal(out, q)
    return blob


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (1, 1), (1, 37), (41, 1), (7, 13), (2, 3, 5), ()])
def test_roundtrip_shapes_and_widths(bits, shape):
    rng = np.random.default_rng(bits)
    r = qmax(bits)
    roundtrip(rng.integers(-r, r + 1, shape).astype(np.int8), bits)
    roundtrip(t_codes(rng, shape, bits, width=max(r / 8, 0.3)), bits)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_roundtrip_structured(bits):
    rng = np.random.default_rng(0)
    r = qmax(bits)
    cases = [
        np.zeros((9, 11), np.int8),
        np.full((4, 6), r, np.int8),
        np.full((4, 6), -r, np.int8),
        np.tile(np.arange(-r, r + 1, dtype=np.int8), (3, 2)),  # every symbol, uniform
        # rows of very different spread, columns of very different spread
        np.clip(np.rint(rng.standard_normal((30, 50)) * np.geomspace(0.01, r, 30)[:, None]), -r, r).astype(np.int8),
        np.clip(np.rint(rng.standard_normal((30, 50)) * np.geomspace(0.01, r, 50)[None, :]), -r, r).astype(np.int8),
    ]
    base = t_codes(rng, (1, 64), bits, r / 4)
    cases.append(np.clip(base + (rng.random((40, 64)) < 0.03), -r, r).astype(np.int8))  # near-duplicate rows
    for q in cases:
        roundtrip(q, bits)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.integers(1, 12), st.integers(1, 40), st.integers(0, 2**32 - 1), st.floats(0.05, 40))
def test_roundtrip_hypothesis(bits, rows, cols, seed, width):
    rng = np.random.default_rng(seed)
    roundtrip(t_codes(rng, (rows, cols), bits, width, nu=3), bits)


def test_deterministic_bytes():
    q = t_codes(np.random.default_rng(1), (64, 96), 6, 2.4)
    assert encode_codes(q, 6) == encode_codes(q.copy(), 6)


def test_iid_codes_land_within_one_percent_of_entropy_plus_model():
    """Codes drawn from a known law: coded bytes <= 1.01 x (n H / 8 + header + lane states)."""
    rng = np.random.default_rng(2)
    bits, r = 6, 31
    support = np.arange(-r, r + 1)
    p = np.exp(-np.abs(support) / 2.5)
    p /= p.sum()
    q = rng.choice(support, size=(256, 256), p=p).astype(np.int8)
    blob = roundtrip(q, bits)
    ideal = q.size * float(-(p * np.log2(p)).sum()) / 8
    overhead = 4 * rans._lanes(q.size) + 16  # lane states + a header with at most a small table
    assert len(blob) <= 1.01 * (ideal + overhead)
    assert len(blob) <= 1.01 * (entropy.order0_bits(q) / 8 + 4 * rans._lanes(q.size) + 200)


def test_estimate_is_close():
    rng = np.random.default_rng(3)
    for bits, width in [(4, 0.8), (6, 2.4), (8, 12.0)]:
        q = t_codes(rng, (128, 256), bits, width)
        assert abs(estimate_encoded_bytes(q, bits) / len(encode_codes(q, bits)) - 1) < 0.005
    assert estimate_encoded_bytes(np.zeros((0, 4), np.int8), 4) == len(encode_codes(np.zeros((0, 4), np.int8), 4))


def test_row_and_column_spread_beat_order0_and_brotli():
    """Per-row amax codes with input-channel spread: the context model beats order-0 entropy and brotli-11."""
    rng = np.random.default_rng(4)
    w = rng.standard_t(4, (256, 256)) * np.exp(rng.normal(0, 0.5, 256))[None, :]
    q = np.clip(np.rint(w / (np.abs(w).max(1, keepdims=True) / 31)), -31, 31).astype(np.int8)
    n = len(roundtrip(q, 6))
    assert n < 0.97 * entropy.order0_bits(q) / 8
    assert n < 0.97 * len(brotli.compress(q.tobytes(), quality=11, lgwin=24))


def test_near_duplicate_rows_are_predicted():
    rng = np.random.default_rng(5)
    base = t_codes(rng, (1, 256), 8, 20.0)
    rows = [t_codes(rng, (1, 256), 8, 20.0) for _ in range(20)]
    rows += [np.clip(base + (rng.random((1, 256)) < 0.02), -127, 127).astype(np.int8) for _ in range(60)]
    q = np.concatenate(rows)[rng.permutation(80)]
    n = len(roundtrip(q, 8))
    assert encode_codes(q, 8)[5] == 3  # the split kind (after version and CRC)
    assert n < 0.5 * entropy.order0_bits(q) / 8


def test_damaged_blobs_raise_artifact_error_only():
    rng = np.random.default_rng(6)
    base = t_codes(rng, (1, 40), 4, 2.0)
    cases = [
        (t_codes(rng, (24, 40), 6, 2.4), 6),
        (np.clip(base + (rng.random((30, 40)) < 0.05), -7, 7).astype(np.int8), 4),
        (rng.integers(-127, 128, (6, 70)).astype(np.int8), 8),
        (np.array([[1]], np.int8), 2),
    ]
    raised = 0
    for q, bits in cases:
        blob = encode_codes(q, bits)
        for trial in range(120):
            b = bytearray(blob)
            if trial % 3 == 0:
                b[rng.integers(len(b))] ^= 1 << int(rng.integers(8))
            elif trial % 3 == 1:
                b = b[: rng.integers(len(b))]
            else:
                b[rng.integers(len(b))] = int(rng.integers(256))
            with pytest.raises(ArtifactError):
                decode_codes(bytes(b), q.shape, bits)
            raised += 1
    assert raised == 4 * 120
    for trial in range(300):  # forged bodies behind a valid CRC: the parser itself must reject them
        body = bytes([trial % 4]) + rng.integers(0, 256, trial % 40, dtype=np.uint8).tobytes()
        junk = bytes([rans.VERSION]) + zlib.crc32(body).to_bytes(4, "little") + body
        with pytest.raises(ArtifactError):
            decode_codes(junk, (5, 9), 4)
    with pytest.raises(ArtifactError):
        decode_codes(encode_codes(cases[0][0], 6) + b"\0\0", cases[0][0].shape, 6)


def test_wrong_shape_or_bits_is_artifact_error():
    q = t_codes(np.random.default_rng(7), (16, 16), 6, 2.4)
    blob = encode_codes(q, 6)
    with pytest.raises(ArtifactError):
        decode_codes(blob, (16, 17), 6)
    with pytest.raises(ArtifactError):
        decode_codes(blob, (0, 16), 6)
    with pytest.raises(ArtifactError):
        decode_codes(blob, (16, 16), 9)
    with pytest.raises(ArtifactError):
        decode_codes(b"", (16, 16), 6)


def test_bad_input_is_option_error():
    with pytest.raises(OptionError):
        encode_codes(np.array([[8]], np.int8), 4)
    with pytest.raises(OptionError):
        encode_codes(np.zeros((2, 2), np.int16), 4)
    with pytest.raises(OptionError):
        encode_codes(np.zeros((2, 2), np.int8), 1)


def test_tables_are_valid_distributions():
    for bits in (2, 5, 8):
        for nu_i in range(len(rans._NUS)):
            f = rans._parametric_freq(bits, nu_i)
            assert (f.sum(axis=1) == 2**16).all() and (f >= 1).all()


def test_entropy_bounds():
    q = np.array([[0, 0, 1, 1], [2, 2, 2, 2]], np.int8)
    assert entropy.order0_bits(q) == pytest.approx(8 * 1.5)  # p = 1/4, 1/4, 1/2
    assert entropy.row_conditional_bits(q) == pytest.approx(4.0)  # one bit per code in row 0, none in row 1
    assert entropy.column_conditional_bits(q) == pytest.approx(4 * 2 * 1.0)
    b = entropy.bytes_bound(q)
    assert (b.order0, b.rows, b.cols) == pytest.approx((1.5, 0.5, 1.0))
    assert entropy.order0_bits(np.zeros((0, 3), np.int8)) == 0.0
    rng = np.random.default_rng(8)
    w = np.clip(np.rint(rng.standard_t(4, (32, 64)) * np.linspace(0.2, 8, 32)[:, None]), -31, 31).astype(np.int8)
    assert entropy.row_conditional_bits(w) < 0.95 * entropy.order0_bits(w)
    assert entropy.order0_bits(w.astype(np.int64)) == pytest.approx(entropy.order0_bits(w))  # any integer dtype
    np.testing.assert_allclose(entropy.row_bits(q), [4.0, 0.0])
    np.testing.assert_allclose(entropy.histogram_bits([[1, 1, 2], [0, 3, 0]]), [6.0, 0.0])  # sum c log2(n / c)


def test_round_trip_on_the_bundled_model_codes():
    """Real trained weights reach model corners synthetic data does not (e.g. large negative class shifts)."""
    from golfquant.checkpoint import load_checkpoint
    from golfquant.data import default_data_dir
    from golfquant.quant.clip import parse_clip, round_codes, row_scales

    sd = load_checkpoint(default_data_dir() / "model.pt").state_dict
    for name, w in sd.items():
        if w.dim() != 2 or w.numel() < 65536:
            continue
        for bits, clip in ((2, "amax"), (4, "sdclip:2"), (6, "amax")):
            codes = round_codes(w.float(), row_scales(w.float(), bits, parse_clip(clip)), bits).numpy()
            blob = encode_codes(codes, bits)
            assert np.array_equal(decode_codes(blob, codes.shape, bits), codes), (name, bits, clip)


def _batch_cases():
    """Blobs of every kind: empty, order-0, parametric (one and several lanes, a partial last step), row references
    resolved in chains (a random walk of rows), side streams of more than one lane (8500 row bytes)."""
    rng = np.random.default_rng(9)
    walk = [np.clip(np.rint(rng.standard_t(4, (1, 64)) * 3), -31, 31)]
    for _ in range(79):
        walk.append(np.clip(walk[-1] + (rng.random((1, 64)) < 0.03) * rng.choice([-1, 1], (1, 64)), -31, 31))
    spread = (rng.random((8500, 1)) ** 3 * 3 + 0.05) * 31 / 3
    cases = [
        (np.zeros((0, 7), np.int8), 4),
        (np.array([[1, -1, 0]], np.int8), 2),
        (t_codes(rng, (7, 13), 5, 1.5), 5),
        (t_codes(rng, (130, 131), 6, 2.4), 6),  # 3 lanes, the last step partial
        (t_codes(rng, (300, 200), 8, 12.0), 8),
        (np.concatenate(walk).astype(np.int8), 6),
        (np.clip(np.rint(rng.standard_normal((8500, 8)) * spread), -31, 31).astype(np.int8), 6),
        ((rng.random((30, 40)) < 0.93).astype(np.int8), 2),
    ]
    return [(q, bits, encode_codes(q, bits)) for q, bits in cases]


@pytest.fixture(scope="module")
def batch():
    cases = _batch_cases()
    kinds = {blob[5] for _, _, blob in cases}
    assert kinds == {0, 1, 2, 3}
    assert any(blob[5] == 1 and blob[6] & 1 and rans._lanes(q.shape[0]) > 1 for q, _, blob in cases)
    return cases


def test_decode_many_equals_one_at_a_time(batch, monkeypatch):
    rng = np.random.default_rng(11)
    tiny = [(q, 4, encode_codes(q, 4)) for q in (t_codes(rng, (5, 9), 4, 1.0) for _ in range(40))]
    cases = batch * 2 + tiny  # the same blob twice decodes twice
    items = [(blob, q.shape, bits) for q, bits, blob in cases]
    groups = []
    decode_group = rans._decode_group
    monkeypatch.setattr(rans, "_decode_group", lambda streams: groups.append(len(streams)) or decode_group(streams))
    for out, (q, _, _) in zip(rans.decode_codes_many(items), cases):
        assert out.dtype == np.int8 and out.shape == q.shape
        np.testing.assert_array_equal(out, q)
    assert len(groups) == 2  # the 45-step streams apart: padding them to ~7,500 steps would cost more than them
    groups.clear()
    monkeypatch.setattr(rans, "_GROUP_ROWS", 40)  # a group's frequency rows capped: more groups, same codes
    for out, (q, _, _) in zip(rans.decode_codes_many(items), cases):
        np.testing.assert_array_equal(out, q)
    assert len(groups) > 2
    assert rans.decode_codes_many([]) == []


def test_side_streams_in_python_and_in_numpy():
    """Row/column bytes are coded and decoded symbol by symbol up to _SCALAR_LANES lanes, in lockstep above: the
    same bytes and the same checks."""
    rng = np.random.default_rng(10)
    for n in (500, 8192, 20000, 200000):  # 1, 1, 3 and 25 lanes
        v = np.minimum(rng.geometric(0.05, n), 255)
        table, freq = rans._table_bytes(np.bincount(v, minlength=256), 12)
        stream = rans._rans_encode(v, np.zeros(n, np.int64), freq[None])
        assert table + rans._varints(np.array([len(stream)])) + stream == rans._encode_values(v)

        def side(data):
            return rans._decode_values(rans._Reader(table + rans._varints(np.array([len(data)])) + data), n)

        np.testing.assert_array_equal(side(stream), v)
        with pytest.raises(ArtifactError, match="rANS stream ends early"):
            side(stream[:-2])
        with pytest.raises(ArtifactError, match="rANS stream does not decode to its initial state"):
            side(stream + b"\0\0")
        with pytest.raises(ArtifactError, match="rANS stream"):
            side(stream[:-4] + bytes([stream[-4] ^ 0x10]) + stream[-3:])
    assert rans._lanes(200000) > rans._SCALAR_LANES >= rans._lanes(20000)


def _reseal(blob: bytes, body: bytes) -> bytes:
    return blob[:1] + zlib.crc32(body).to_bytes(4, "little") + body


def test_decode_many_names_the_damaged_blob(batch):
    items = [(blob, q.shape, bits) for q, bits, blob in batch]
    names = [f"blob{i}" for i in range(len(items))]
    target = next(i for i, (_, _, blob) in enumerate(batch) if blob[5] == 1 and len(blob) > 1000)
    blob, shape, bits = items[target]
    damaged = [
        blob[:-1] + bytes([blob[-1] ^ 1]),  # CRC mismatch: found while parsing
        _reseal(blob, blob[5:-2]),  # one word short behind a valid CRC: found by the lockstep decode
        _reseal(blob, blob[5:] + b"\0\0"),  # one word too many
        _reseal(blob, blob[5:-6] + bytes(4) + blob[-2:]),  # words changed
    ]
    for bad in damaged:
        forged = items[:target] + [(bad, shape, bits)] + items[target + 1:]
        with pytest.raises(ArtifactError, match=f"^blob{target}: rANS"):
            rans.decode_codes_many(forged, names)
        with pytest.raises(ArtifactError, match="^rANS"):
            decode_codes(bad, shape, bits)


def test_the_size_model_shortcuts_equal_their_definitions():
    # The median width class from the convolved histograms, and the shift search over every shift at once, against
    # the median of the whole matrix and one cost per (nu, shift).
    rng = np.random.default_rng(11)
    for rows, cols in ((1, 1), (2, 3), (7, 4), (64, 33), (300, 512)):
        a, b = rng.integers(0, 40, rows), rng.integers(0, 90, cols)
        assert rans._median_of_sums(a, b) == int(np.median(a[:, None] + b[None, :]))
    bits, nsym = 6, 63
    k0v = np.arange(20, 60)
    hist = rng.poisson(3.0, (k0v.size, nsym)).astype(np.float64)
    shifts, nus = range(-5, 30, 3), range(len(rans._NUS))
    cost = {nu: rans._parametric_cost(bits, nu) for nu in nus}
    direct = min((float((hist * cost[nu][np.clip(k0v + s, 0, rans._K - 1)]).sum()), nu, s)
                 for nu in nus for s in shifts)
    found = rans._search(hist, k0v, bits, shifts, nus)
    assert found[1:] == direct[1:] and found[0] == pytest.approx(direct[0], rel=1e-12)
