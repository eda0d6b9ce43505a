"""Byte codecs at their strongest settings, with bounded (decompression-bomb safe) decoders.

Every decoder takes `max_size`, never holds much more than that in memory, and raises ArtifactError on damaged,
truncated or oversized input.
"""
from __future__ import annotations

import io
import lzma
import zlib
from dataclasses import dataclass
from typing import Callable

import brotli
import zstandard

from golfquant.errors import ArtifactError

_CHUNK = 1 << 20  # output granularity of the streaming decoders


@dataclass(frozen=True)
class ByteCodec:
    name: str
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes, int], bytes]  # (data, max_size) -> bytes of length <= max_size


def _too_big(name: str, max_size: int) -> ArtifactError:
    return ArtifactError(f"{name} section decompresses to more than its declared {max_size} bytes")


def _none_decompress(data: bytes, max_size: int) -> bytes:
    if len(data) > max_size:
        raise _too_big("none", max_size)
    return bytes(data)


def _zlib_compress(data: bytes) -> bytes:
    return zlib.compress(data, 9)


def _bounded(name: str, d, error: type[Exception], data: bytes, max_size: int) -> bytes:
    """One call of a zlib/lzma-style decompressor object, stopped one byte past max_size."""
    try:
        out = d.decompress(data, max_size + 1)
    except error as e:
        raise ArtifactError(f"{name} section is damaged: {e}") from None
    if len(out) > max_size:
        raise _too_big(name, max_size)
    if not d.eof or d.unused_data:
        raise ArtifactError(f"{name} section is truncated or has trailing bytes")
    return out


def _zlib_decompress(data: bytes, max_size: int) -> bytes:
    return _bounded("zlib", zlib.decompressobj(), zlib.error, data, max_size)


# Raw LZMA2 (no xz container: saves ~60 bytes per stream) at preset 9e. lc=lp=pb=0 measured smallest on int8 and
# nibble-packed codes (tests/test_codec.py::test_lzma_tuned_beats_xz): codes have no byte-position structure.
_LZMA_MAX_DICT = 1 << 26  # preset 9's dictionary


def _lzma_filters(size: int) -> list[dict]:
    """The dictionary covers `size` bytes (power of two, 4 KiB..64 MiB). A larger one changes nothing but costs
    ~80 ms of match-finder setup per call to encode, and its full allocation to decode (the decoder allocates it
    up front, so decoding with the expected output size keeps memory proportional to that size)."""
    dict_size = min(_LZMA_MAX_DICT, max(4096, 1 << max(size - 1, 1).bit_length()))
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 0, "lp": 0, "pb": 0,
             "dict_size": dict_size}]


def _lzma_compress(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_lzma_filters(len(data)))


def _lzma_decompress(data: bytes, max_size: int) -> bytes:
    # Valid: a stream of at most max_size bytes never matches further back than max_size.
    d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_lzma_filters(max_size))
    return _bounded("lzma", d, lzma.LZMAError, data, max_size)


def _zstd_compress(data: bytes) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(22, source_size=len(data), enable_ldm=True)
    return zstandard.ZstdCompressor(compression_params=params).compress(data)


def _zstd_decompress(data: bytes, max_size: int) -> bytes:
    # Not ZstdDecompressor.decompress: it allocates whatever content size a (possibly forged) frame header claims.
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
    chunks, total = [], 0
    try:
        while total <= max_size:
            chunk = reader.read(min(_CHUNK, max_size + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except zstandard.ZstdError as e:
        raise ArtifactError(f"zstd section is damaged: {e}") from None
    if total > max_size:
        raise _too_big("zstd", max_size)
    return b"".join(chunks)


def _brotli_compress(data: bytes) -> bytes:
    return brotli.compress(data, quality=11, lgwin=24)


def _brotli_decompress(data: bytes, max_size: int) -> bytes:
    d = brotli.Decompressor()
    chunks, total = [], 0
    try:
        chunk = d.process(data, output_buffer_limit=min(_CHUNK, max_size + 1))
        while chunk:
            chunks.append(chunk)
            total += len(chunk)
            if total > max_size:
                raise _too_big("brotli", max_size)
            if d.is_finished():
                break
            chunk = d.process(b"", output_buffer_limit=min(_CHUNK, max_size + 1 - total))
    except brotli.error as e:
        raise ArtifactError(f"brotli section is damaged: {e}") from None
    if not d.is_finished():
        raise ArtifactError("brotli section is truncated")
    return b"".join(chunks)


NONE = ByteCodec("none", bytes, _none_decompress)
ZLIB = ByteCodec("zlib", _zlib_compress, _zlib_decompress)
ZSTD = ByteCodec("zstd", _zstd_compress, _zstd_decompress)
BROTLI = ByteCodec("brotli", _brotli_compress, _brotli_decompress)
LZMA = ByteCodec("lzma", _lzma_compress, _lzma_decompress)
