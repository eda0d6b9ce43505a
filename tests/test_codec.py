import lzma
import os
import tracemalloc

import numpy as np
import pytest

from golfquant.codec import (BYTE_CODECS, CODES_CODECS, check_codec_names, compress, compress_best, decompress,
                             register_codes_codec)
from golfquant.errors import ArtifactError, OptionError

SAMPLES = [b"", b"x", os.urandom(3000), bytes(5000), b"golfquant " * 700]


@pytest.mark.parametrize("name", list(BYTE_CODECS))
def test_round_trip(name):
    for data in SAMPLES:
        blob = compress(data, name)
        assert decompress(blob, name, len(data)) == data
        assert decompress(blob, name, len(data) + 100) == data


def test_codec_names_and_settings():
    assert list(BYTE_CODECS) == ["none", "zlib", "zstd", "brotli", "lzma"]
    blob = compress(b"abc" * 100, "lzma")
    assert not blob.startswith(b"\xfd7zXZ")  # raw LZMA2: no xz container


@pytest.mark.parametrize("name", list(BYTE_CODECS))
def test_decompression_bomb_is_refused_without_allocating_it(name):
    bomb = compress(bytes(8 << 20), name)
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match="more than its declared 1000 bytes"):
            decompress(bomb, name, 1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # "none" holds the input itself; the others must stay far below the 8 MiB they would expand to
    assert name == "none" or peak < (1 << 20)


@pytest.mark.parametrize("name", [n for n in BYTE_CODECS if n != "none"])
def test_damaged_or_truncated_streams_raise_artifact_error(name):
    data = os.urandom(2000) + bytes(2000)
    blob = compress(data, name)
    for bad in (blob[: len(blob) // 2], blob[:1], b"\xff" * 40, blob + b"trailing"):
        try:
            out = decompress(bad, name, len(data))
        except ArtifactError:
            continue
        # a codec without an end-of-stream check may return a short or equal result, never a wrong full one
        assert len(out) < len(data) or out == data


def test_unknown_codec_names():
    with pytest.raises(OptionError, match="unknown byte codec 'lz4'"):
        compress(b"x", "lz4")
    with pytest.raises(ArtifactError, match="unknown byte codec 'lz4'"):
        decompress(b"x", "lz4", 10)
    with pytest.raises(OptionError, match="unknown codec 'lz4'"):
        check_codec_names(["zlib", "lz4"])
    with pytest.raises(OptionError):
        check_codec_names([])
    with pytest.raises(OptionError):
        compress_best(b"x", ["lz4"])


def test_compress_best_returns_the_smallest():
    data = b"".join(os.urandom(16) * 50 for _ in range(20))
    name, blob = compress_best(data)
    sizes = {n: len(compress(data, n)) for n in BYTE_CODECS}
    assert len(blob) == min(sizes.values()) and sizes[name] == len(blob)
    assert decompress(blob, name, len(data)) == data
    # candidates restrict the search; their order does not matter (ties go to the registry order)
    assert compress_best(data, ["zlib", "none"]) == compress_best(data, ["none", "zlib"])
    assert compress_best(data, ["zlib"])[0] == "zlib"
    # incompressible data: "none" wins and beats every real codec's overhead
    noise = os.urandom(4096)
    assert compress_best(noise) == ("none", noise)


def test_lzma_tuned_beats_xz():
    """Raw LZMA2 with lc=lp=pb=0 vs xz preset 9e on int4 codes of heavy-tailed weights (one code per byte)."""
    rng = np.random.default_rng(0)
    w = rng.standard_t(4, size=(256, 1024)) * rng.uniform(0.5, 2.0, size=(256, 1))
    codes = np.clip(np.round(w / (np.abs(w).max(1, keepdims=True) / 7)), -7, 7).astype(np.int8).tobytes()
    tuned = len(compress(codes, "lzma"))
    xz = len(lzma.compress(codes, preset=9 | lzma.PRESET_EXTREME))
    print(f"int4 codes {len(codes)} B: lzma(raw, lc0 lp0 pb0) {tuned} B, xz -9e {xz} B")
    assert tuned < xz


def test_register_codes_codec_rejects_name_clashes():
    with pytest.raises(ValueError):
        register_codes_codec("zlib", object())
    register_codes_codec("test-dummy", object())
    try:
        with pytest.raises(ValueError):
            register_codes_codec("test-dummy", object())
        assert check_codec_names(["test-dummy"]) == ["test-dummy"]
    finally:
        CODES_CODECS.pop("test-dummy")
