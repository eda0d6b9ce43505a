"""Fast estimates of a section's compressed bytes for every (codec, layout) candidate, for search loops.

Real compression is slow (brotli-11 and lzma-9 run at ~0.5-1 MB/s), so the writer and the budget searches rank
candidates with estimates and compress only the promising ones:

* rans (codes codec): `golfquant.codec.rans.fit_size_model`, within ~0.3% of the real size; the fitted model is
  kept, so encoding the chosen candidate does not fit it again.
* byte codecs: FACTORS[codec] x the order-0 entropy of the packed (or shuffled) byte stream. The factors are the
  median real/entropy ratios measured by benchmarks/codecs.py on trained and synthetic codes (int2..int8, every
  layout); there the estimate is within a few % (LZ codecs exploit repeated rows that an order-0 entropy does not
  see, so near-duplicate embeddings compress up to ~10% below it). `none` is exact.
* other codes codecs (registered by users): no estimate (None): callers must try them.

Keys are (codec, layout) pairs, layout None for codes codecs, as in the artifact's section table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from golfquant.codec import BYTE_CODECS, CODES_CODECS
from golfquant.codec.entropy import order0_bits
from golfquant.codec.rans import SizeModel, fit_size_model
from golfquant.pack import layouts_for, pack_codes

Candidate = tuple[str, "str | None"]  # (codec, layout)

# real bytes / order-0 byte entropy of the stream, median over benchmarks/codecs.py's sections
FACTORS = {"zlib": 1.17, "zstd": 1.016, "brotli": 1.012, "lzma": 1.045}
RANS = "rans"


def order0_bytes(values) -> float:
    """Order-0 entropy of int8 codes or of a byte string, in bytes (np.bincount: ~10 ns per value)."""
    return order0_bits(values) / 8


def estimate_stream_bytes(data: bytes, codec: str, entropy: float | None = None) -> float:
    """Estimated compressed bytes of `data` under a byte codec (exact for `none`); `entropy`: order0_bytes(data)
    when the caller has it already."""
    if codec == "none":
        return float(len(data))
    return FACTORS.get(codec, 1.0) * (order0_bytes(data) if entropy is None else entropy)


@dataclass
class SectionEstimate:
    """Estimates for one codes section; `streams` holds each layout's packed bytes (reused by the writer)."""

    bytes: dict[Candidate, float | None]
    streams: dict[str, bytes] = field(default_factory=dict)
    rans_model: SizeModel | None = None

    def ranked(self) -> list[Candidate]:
        """Candidates without an estimate first (they must be tried), then by estimate, then by stream length
        (denser layouts compress better at equal entropy), then in the given order (deterministic)."""
        keys = list(self.bytes)

        def key(i: int):
            codec, layout = keys[i]
            est = self.bytes[keys[i]]
            return (est is not None, est or 0.0, len(self.streams[layout]) if layout else 0, i)

        return [keys[i] for i in sorted(range(len(keys)), key=key)]


def estimate_codes_section(codes: np.ndarray, bits: int, byte_codecs: Iterable[str] | None = None,
                           codes_codecs: Iterable[str] | None = None,
                           layouts: Iterable[str] | None = None) -> SectionEstimate:
    """Estimates for every allowed layout x byte codec and every codes codec (defaults: all registered)."""
    arr = np.asarray(codes)
    byte_codecs = list(BYTE_CODECS) if byte_codecs is None else list(byte_codecs)
    codes_codecs = list(CODES_CODECS) if codes_codecs is None else list(codes_codecs)
    allowed = [name for name in layouts_for(bits, arr.ndim) if layouts is None or name in layouts]
    est = SectionEstimate({})
    seen: set[bytes] = set()
    for layout in allowed:
        packed = pack_codes(arr, bits, layout)
        if packed in seen:  # e.g. nibble and planes are the same bytes at 4 bits
            continue
        seen.add(packed)
        est.streams[layout] = packed
        entropy = order0_bytes(packed)
        for codec in byte_codecs:
            est.bytes[(codec, layout)] = estimate_stream_bytes(packed, codec, entropy)
    for codec in codes_codecs:
        if codec == RANS:
            est.rans_model = fit_size_model(arr, bits)
            est.bytes[(codec, None)] = est.rans_model.estimated_bytes
        else:
            est.bytes[(codec, None)] = None
    return est


@dataclass(frozen=True)
class ScaledEntropyPricer:
    """Prices changed codes of one section: their order-0 entropy times (real bytes / entropy) of the codes the
    section was compressed from. Pruning search loops use it: it follows the histogram as a refit coder would (a
    model frozen with the old tables under-credits large changes, such as zeroing 30% of the codes), and the ratio
    carries the coder's gain over order-0 (row/column widths)."""

    ratio: float

    @classmethod
    def fit(cls, codes, real_bytes: float) -> "ScaledEntropyPricer":
        h = order0_bytes(codes)
        return cls(real_bytes / h if h > 0 else 1.0)

    def __call__(self, codes) -> float:
        return self.ratio * order0_bytes(codes)
