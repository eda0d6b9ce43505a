"""Codec registries: byte codecs (bytes -> bytes) and codes codecs (integer codes -> bytes).

A section of the artifact is encoded either by a layout (golfquant.pack) followed by a byte codec, or directly by a
codes codec; artifact.py tries both kinds and keeps the smallest. Names are unique across the two registries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from golfquant.codec import lz, rans
from golfquant.codec.lz import ByteCodec
from golfquant.errors import ArtifactError, OptionError

# Insertion order is the tie-break order of compress_best: simplest decoder first.
BYTE_CODECS: dict[str, ByteCodec] = {c.name: c for c in (lz.NONE, lz.ZLIB, lz.ZSTD, lz.BROTLI, lz.LZMA)}


class CodesEncoder(Protocol):
    """Entropy coder working on integer codes rather than bytes.

    encode: int8 codes in [-qmax(bits), qmax(bits)] of any shape -> bytes (shape and bits are stored elsewhere).
    decode: must return an int8 array of exactly `shape`, allocate nothing proportional to anything but `shape`,
    and raise golfquant.errors.ArtifactError on malformed input (the blob comes from an untrusted file).
    An encoder may also have `decode_many(items, names)`: decode of every (blob, shape, bits) at once, which the
    artifact reader then uses for all of its sections.
    """

    def encode(self, codes: np.ndarray, bits: int) -> bytes: ...

    def decode(self, blob: bytes, shape: tuple[int, ...], bits: int) -> np.ndarray: ...


@dataclass(frozen=True)
class CodesCodec:
    """A CodesEncoder made of functions."""

    encode: Callable[[np.ndarray, int], bytes]
    decode: Callable[[bytes, tuple[int, ...], int], np.ndarray]
    decode_many: Callable[[Sequence[tuple[bytes, tuple[int, ...], int]], Sequence[str]], list[np.ndarray]] | None = None


CODES_CODECS: dict[str, CodesEncoder] = {}


def register_codes_codec(name: str, encoder: CodesEncoder) -> None:
    if name in BYTE_CODECS or name in CODES_CODECS:
        raise ValueError(f"codec name '{name}' is already registered")
    CODES_CODECS[name] = encoder


register_codes_codec("rans", CodesCodec(rans.encode_codes, rans.decode_codes, rans.decode_codes_many))


def check_codec_names(names: Iterable[str]) -> list[str]:
    """Validate user-chosen codec names (byte or codes codecs) and return them as a list."""
    names = list(names)
    known = [*BYTE_CODECS, *CODES_CODECS]
    for name in names:
        if name not in known:
            raise OptionError(f"unknown codec '{name}': use one of {', '.join(known)}")
    if not names:
        raise OptionError("the codec list is empty: name at least one of " + ", ".join(known))
    return names


def compress(data: bytes, name: str) -> bytes:
    if name not in BYTE_CODECS:
        raise OptionError(f"unknown byte codec '{name}': use one of {', '.join(BYTE_CODECS)}")
    return BYTE_CODECS[name].compress(bytes(data))


def decompress(data: bytes, name: str, max_size: int) -> bytes:
    """Decode at most max_size bytes; longer output, damage or an unknown codec raise ArtifactError.

    The result may be shorter than max_size (e.g. a truncated zstd frame): callers compare it with the length they
    expect.
    """
    if name not in BYTE_CODECS:
        raise ArtifactError(f"unknown byte codec '{name}' (known: {', '.join(BYTE_CODECS)})")
    return BYTE_CODECS[name].decompress(bytes(data), max_size)


def compress_best(data: bytes, candidates: Iterable[str] | None = None) -> tuple[str, bytes]:
    """Compress with every candidate byte codec; keep the smallest (ties go to the earlier codec of BYTE_CODECS)."""
    wanted = None if candidates is None else list(candidates)
    for name in wanted or []:
        if name not in BYTE_CODECS:
            raise OptionError(f"unknown byte codec '{name}': use one of {', '.join(BYTE_CODECS)}")
    names = [n for n in BYTE_CODECS if wanted is None or n in wanted]
    if not names:
        raise OptionError("no byte codec to try: name at least one of " + ", ".join(BYTE_CODECS))
    blobs = [(name, compress(data, name)) for name in names]
    return min(blobs, key=lambda nb: len(nb[1]))
