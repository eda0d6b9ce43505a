"""rANS coder for symmetric integer codes with a row x column width context model.

Why: compressed size follows the entropy of the codes, and the codes of a weight matrix are not identically
distributed: every row (per-row amax scales) and every input column (trained channels) has its own spread.
The model gives code q_ij a discretized Student-t law whose width depends on its row and column:

    class k_ij = clip(A_i + B_j + shift, 0, 159),   width_k = 2 ** ((k - 72) / 8)   (1/8-octave steps),
    P(q) = F_nu((q + 1/2) / width) - F_nu((q - 1/2) / width),   the outer codes +-qmax take the clipped tails,

with one byte A_i per row and B_j per column (themselves entropy coded), nu in {2, 4, ..., 128} and the shift
per tensor. The encoder fits A, B by moments, refines them and picks nu/shift by the exact coded size, and
also tries rows-only, columns-only, no context and a plain stored order-0 table; the smallest wins (the kind
and flags bytes record the choice). Near-identical rows (rarely seen tokens of a trained embedding, which LZ
codecs match) are predicted from an earlier row and only their wrapped residuals are coded (kind 3). The
decoder rebuilds the tables from these parameters with only + - * / and sqrt in float64 (IEEE-exact, so
identical on every machine), then rounds them to 16-bit frequencies.

Public: encode_codes / decode_codes / decode_codes_many (many blobs at once: what an artifact's reader calls);
estimate_encoded_bytes (size without coding); fit_size_model (the chosen model, to read its estimate and then
encode without fitting again); size_breakdown.

Stream: W interleaved rANS lanes (32-bit state in [2^16, 2^32), 16-bit words, 16-bit probabilities); element
e of the row-major flattening goes to lane e % W at step e // W, so encode and decode are numpy ops across
lanes with one Python iteration per step. decode_codes_many steps the lanes of the streams of all its blobs
together (one iteration per step for all of them, not per step of each: most of an artifact's load time), and
decodes the small side streams (row and column bytes, row references) symbol by symbol in plain Python. The
decoder checks a CRC-32, that every lane ends in its initial state and that every word was used, so damaged
input raises ArtifactError. Encoder, decoder and size model stay in one module because all three must build the
same tables from the same parameters.

Blob: version, CRC-32 of the body (uint32), body = kind, then per kind (all integers little-endian):
  kind 0: empty tensor (nothing else)
  kind 1 (parametric): flags (bit0 rows, bit1 cols), nu index, shift int16, [A values], [B values], stream
  kind 2 (order-0): table, stream
  kind 3 (split): row flags, distances back to the reference row (low, high bytes) as values, varint length +
                  body (kind 1|2 ...) of the unreferenced rows, body of the others' residuals
                  (code - reference code, wrapped into [-qmax, qmax]); each kind picks its own model
values = table + varint length + stream; table = lo, span, precision p, then span+1 varint frequencies
summing to 2^p; stream = W uint32 final lane states, then uint16 words.
"""
from __future__ import annotations

import bisect
import functools
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from golfquant.codec.entropy import row_bits
from golfquant.errors import ArtifactError, OptionError
from golfquant.quant.qtensor import MAX_BITS, MIN_BITS, qmax

VERSION = 1
_KIND_EMPTY, _KIND_PARAMETRIC, _KIND_ORDER0, _KIND_SPLIT = 0, 1, 2, 3
_ENVELOPE = 5  # version byte + CRC-32 of the body
_PROB_BITS = 16
_M = 1 << _PROB_BITS
_LOW = 1 << 16  # lane states live in [_LOW, 2^32)
_NUS = (2, 4, 6, 8, 12, 16, 24, 32, 64, 128)
_K = 160  # width classes
_K_UNIT = 72  # class of width 1
_OCTAVE = 8  # classes per octave
# 2 ** (m / 8) as literals: float parsing is exact everywhere, libm's pow is not.
_ROOTS = np.array([1.0, 1.0905077326652577, 1.189207115002721, 1.2968395546510096,
                   1.4142135623730951, 1.5422108254079407, 1.681792830507429, 1.8340080864093424])
_SIDE_PREC = 12
_STEPS_PER_LANE = 8192  # lanes = ceil(n / this): 4 flush bytes per lane vs Python steps per call
_MAX_LANES = 1024
_REFINE = (-2, -1, 1, 2)
_NEIGHBOURS = (-4, -3, -2, -1, 1, 2, 3, 4)  # positions in the row sort searched for a reference row
_RANS_LOSS = 0.0002  # bytes per symbol and ideal bit (up to 2) that a stream spends above its ideal size (measured)


def _check_bits(bits, err) -> int:
    if not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise err(f"code width bits={bits!r} is not supported; use an integer in {MIN_BITS}..{MAX_BITS}")
    return int(bits)


def _lanes(n: int) -> int:
    return max(1, min(_MAX_LANES, -(-n // _STEPS_PER_LANE)))


# ---------------------------------------------------------------- tables


def _t_cdf(t: np.ndarray, nu: int) -> np.ndarray:
    """Student-t CDF for even nu: 1/2 + t / (2 sqrt(nu + t^2)) * sum_j c_j (nu / (nu + t^2))^j."""
    d = nu + t * t
    x = nu / d
    term = np.ones_like(t)
    acc = np.ones_like(t)
    c = 1.0
    for j in range(1, nu // 2):
        c = c * (2 * j - 1) / (2 * j)
        term = term * x
        acc = acc + c * term
    return 0.5 + t / (2.0 * np.sqrt(d)) * acc


def _quantize(p: np.ndarray, total: int) -> np.ndarray:
    """Probabilities (rows) -> integer frequencies summing to `total`; every p > 0 gets at least 1."""
    present = p > 0
    nz = present.sum(axis=-1, keepdims=True)
    f = np.where(present, np.floor(p * (total - nz)) + 1, 0).astype(np.int64)
    rows = np.arange(f.shape[0])
    f[rows, f.argmax(axis=-1)] += total - f.sum(axis=-1)
    return f


@functools.lru_cache(maxsize=None)
def _parametric_freq(bits: int, nu_index: int) -> np.ndarray:
    """[K, S] frequencies (sum 2^16 per row) of the discretized t law for every width class."""
    r = qmax(bits)
    k = np.arange(_K)
    widths = np.ldexp(_ROOTS[k % _OCTAVE], k // _OCTAVE - _K_UNIT // _OCTAVE)
    edges = (np.arange(-r, r) + 0.5)[None, :] / widths[:, None]
    cdf = np.concatenate([np.zeros((_K, 1)), _t_cdf(edges, _NUS[nu_index]), np.ones((_K, 1))], axis=1)
    # Every code stays codable: the tails of a narrow law still get one count out of 2^16.
    f = _quantize(np.maximum(np.diff(cdf, axis=1), 1e-300), _M)
    f.setflags(write=False)
    return f


@functools.lru_cache(maxsize=None)
def _parametric_cost(bits: int, nu_index: int) -> np.ndarray:
    c = -np.log2(_parametric_freq(bits, nu_index) / _M)
    c.setflags(write=False)
    return c


# ---------------------------------------------------------------- byte helpers


class _Reader:
    """Bounds-checked cursor over a blob; every short read is an ArtifactError."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ArtifactError("rANS blob is truncated or damaged; re-create the artifact")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value = 0
        for shift in range(0, 35, 7):
            b = self.u8()
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
        raise ArtifactError("rANS blob holds an over-long varint; the artifact is damaged")

    def rest(self) -> memoryview:
        return self.take(len(self.data) - self.pos)


def _varints(values: np.ndarray) -> bytes:
    out = bytearray()
    for v in values.tolist():
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


# ---------------------------------------------------------------- interleaved rANS


def _with_padding_class(freq: np.ndarray) -> np.ndarray:
    """Append a class that gives symbol 0 all of 2^16: coding it leaves a lane state unchanged."""
    pad = np.zeros((1, freq.shape[1]), np.int64)
    pad[0, 0] = _M
    return np.concatenate([freq.astype(np.int64), pad])


def _rans_encode(sym: np.ndarray, cls: np.ndarray, freq: np.ndarray) -> bytes:
    """Encode symbols sym[e] with frequency row freq[cls[e]] (rows summing to 2^16)."""
    n = sym.size
    lanes = _lanes(n)
    steps = -(-n // lanes)
    freq = _with_padding_class(freq)
    cum = np.cumsum(freq, axis=1) - freq
    flat = np.full(steps * lanes, (freq.shape[0] - 1) * freq.shape[1], np.int64)
    flat[:n] = cls * freq.shape[1] + sym
    f = freq.ravel().astype(np.uint64)[flat].reshape(steps, lanes)
    c = cum.ravel().astype(np.uint64)[flat].reshape(steps, lanes)
    limit = f << np.uint64(16)
    x = np.full(lanes, _LOW, np.uint64)
    chunks = []
    for t in range(steps - 1, -1, -1):
        m = x >= limit[t]
        if m.any():
            chunks.append(x[m].astype(np.uint16))
            x[m] >>= np.uint64(16)
        d, r = np.divmod(x, f[t])
        x = (d << np.uint64(_PROB_BITS)) + r + c[t]
    words = np.concatenate(chunks)[::-1] if chunks else np.zeros(0, np.uint16)
    return x.astype("<u4").tobytes() + words.astype("<u2").tobytes()


class _Stream:
    """One interleaved rANS stream to decode: n symbols, symbol e coded with the frequency row freq[cls[e]] (with
    cls None, row 0 for all); label prefixes its errors. Creating it checks the stream's length and lane states,
    so callers make one before they allocate anything of size n (a tiny stream may declare many elements)."""

    def __init__(self, data: memoryview, n: int, freq: np.ndarray):
        self.n, self.freq, self.label = n, freq, ""
        self.cls: np.ndarray | None = None  # uint8 [n]
        self.used = np.zeros(1, np.int64)  # the classes cls holds, ascending
        self.lanes = _lanes(n)
        self.steps = -(-n // self.lanes)
        nbytes = len(data) - 4 * self.lanes
        if nbytes < 0 or nbytes % 2:
            raise ArtifactError("rANS stream has a wrong length; the artifact is truncated or damaged")
        self.states = np.frombuffer(data, "<u4", self.lanes).astype(np.int64)
        self.words = np.frombuffer(data, "<u2", offset=4 * self.lanes)
        if (self.states < _LOW).any():
            raise ArtifactError("rANS lane state out of range; the artifact is damaged")

    def fail(self, ended_early: bool) -> ArtifactError:
        if ended_early:
            return ArtifactError(f"{self.label}rANS stream ends early; the artifact is truncated or damaged")
        return ArtifactError(f"{self.label}rANS stream does not decode to its initial state; the artifact is damaged")


def _decode_scalar(st: _Stream) -> np.ndarray:
    """Symbols of a stream of one frequency row and few lanes (the side information), one Python step per symbol:
    far cheaper than a numpy step over one or two lanes."""
    freq = st.freq[0].tolist()
    cum = [0, *np.cumsum(st.freq[0]).tolist()]
    x, words = st.states.tolist(), st.words.tolist()
    out = bytearray(st.n)
    at = 0
    try:
        for first in range(0, st.n, st.lanes):
            # the highest lane first: the order in which the encoder wrote the words of one step
            for e in range(min(first + st.lanes, st.n) - 1, first - 1, -1):
                v = x[e - first]
                slot = v & 0xFFFF
                s = bisect.bisect_right(cum, slot) - 1
                v = freq[s] * (v >> 16) + slot - cum[s]
                if v < _LOW:
                    v = v << 16 | words[at]
                    at += 1
                x[e - first] = v
                out[e] = s
    except IndexError:
        raise st.fail(True) from None
    if at != len(words) or any(v != _LOW for v in x):
        raise st.fail(False)
    return np.frombuffer(out, np.uint8)


_GROUP_SLACK = 2  # a lockstep group pads its streams to its longest one: at most this many cells per symbol
_GROUP_ROWS = 2048  # frequency rows of a group: its symbol table takes 64 KiB per row


def _groups(streams: list[_Stream]) -> Iterator[list[int]]:
    """Indexes of the streams, longest first, cut into lockstep groups: a stream joins the current group unless
    that would pad the group past _GROUP_SLACK cells per symbol or take it past _GROUP_ROWS frequency rows."""
    group: list[int] = []
    classes: dict[int, set] = {}  # id(table) -> classes used
    lanes = symbols = rows = 0
    for i in sorted(range(len(streams)), key=lambda i: -streams[i].steps):
        st = streams[i]
        new = set(st.used.tolist()) - classes.get(id(st.freq), set())
        if group and (streams[group[0]].steps * (lanes + st.lanes) > _GROUP_SLACK * (symbols + st.n)
                      or rows + len(new) > _GROUP_ROWS):
            yield group
            group, classes, lanes, symbols, rows = [], {}, 0, 0, 0
            new = set(st.used.tolist())
        group.append(i)
        classes.setdefault(id(st.freq), set()).update(new)
        lanes, symbols, rows = lanes + st.lanes, symbols + st.n, rows + len(new)
    if group:
        yield group


def _decode_streams(streams: list[_Stream]) -> list[np.ndarray]:
    """Symbols (uint8) of every stream: each lockstep group of them decoded together (_decode_group)."""
    out: list[np.ndarray] = [np.empty(0, np.uint8)] * len(streams)
    for group in _groups(streams):
        for i, sym in zip(group, _decode_group([streams[i] for i in group])):
            out[i] = sym
    return out


def _decode_group(streams: list[_Stream]) -> list[np.ndarray]:
    """Symbols of streams decoded in lockstep: one numpy step per step index across the lanes of all of them,
    instead of one per step of each. Streams of fewer steps are padded with a class that leaves a lane unchanged."""
    steps = streams[0].steps
    # Frequency rows, 256 symbols each: row 0 is the padding (symbol 0 takes all of 2^16, which keeps a lane's
    # state), then one per (table, class) used. A table's cmap maps its classes to row << 16 (class len(table): 0).
    rows = [np.eye(1, 256, dtype=np.int64)[0] << _PROB_BITS]
    cmaps: dict[int, np.ndarray] = {}
    for st in streams:
        cmap = cmaps.setdefault(id(st.freq), np.zeros(st.freq.shape[0] + 1, np.int64))
        for c in st.used[cmap[st.used] == 0].tolist():
            cmap[c] = len(rows) << 16
            rows.append(np.pad(st.freq[c], (0, 256 - st.freq.shape[1])))
    freq = np.array(rows)
    lut = np.repeat(np.tile(np.arange(256, dtype=np.uint8), len(rows)), freq.ravel())  # 2^16 slots per row
    low = (np.cumsum(freq, axis=1) - freq).ravel()
    freq = freq.ravel()
    cmap = np.concatenate(list(cmaps.values()))
    table_at = dict(zip(cmaps, np.cumsum([0] + [m.size for m in cmaps.values()]).tolist()))
    lanes = [st.lanes for st in streams]
    offset = np.repeat([table_at[id(st.freq)] for st in streams], lanes)
    # The class of every symbol, one row per step and one column per lane (one byte each: streams may be huge).
    bounds = np.cumsum([0] + lanes)
    cls = np.empty((steps, bounds[-1]), np.uint8)
    for st, a, b in zip(streams, bounds, bounds[1:]):
        full, part = divmod(st.n, st.lanes)
        cls[:full, a:b] = 0 if st.cls is None else st.cls[:full * st.lanes].reshape(full, st.lanes)
        cls[full:, a:b] = st.freq.shape[0]
        if part:
            cls[full, a:a + part] = 0 if st.cls is None else st.cls[full * st.lanes:]
    x = np.concatenate([st.states for st in streams])
    words = np.concatenate([st.words for st in streams] + [np.zeros(1, np.uint16)])  # + one word to clip reads to
    ends = np.cumsum([st.words.size for st in streams])
    last = ends - [st.words.size for st in streams] - 1  # each stream's next word, minus one
    rank = np.arange(bounds[-1])
    sym = np.empty((steps, bounds[-1]), np.uint8)
    for t in range(steps):  # (take: faster than [] indexing)
        high = cmap.take(offset + cls[t])  # frequency row << 16
        slot = x & 0xFFFF
        s = sym[t] = lut.take(high | slot)
        i = (high >> 8) | s
        x = freq.take(i) * (x >> 16) + slot - low.take(i)
        renorm = (x < _LOW).nonzero()[0]
        if not renorm.size:
            continue
        # A step reads the words of a stream highest lane first: the lane of rank g among all renormalizing
        # ones, in a stream whose renormalizing lanes end at rank `end`, reads word last + end - g.
        if len(streams) == 1:  # (decode_codes of one blob: a slice is cheaper)
            read = words[last[0] + 1:last[0] + 1 + renorm.size][::-1]
            if read.size < renorm.size:
                raise streams[0].fail(True)
            last += renorm.size
        else:
            end = renorm.searchsorted(bounds)
            k = end[1:] - end[:-1]
            read = words.take(np.repeat(last + end[1:], k) - rank[:renorm.size], mode="clip")
            last += k
        x[renorm] = (x.take(renorm) << 16) | read
    del cls
    out = []
    for st, a, b, p, end in zip(streams, bounds, bounds[1:], last + 1, ends):
        if p != end or (x[a:b] != _LOW).any():
            raise st.fail(p > end)  # a damaged stream may read past its words: clipped reads, caught here
        out.append(sym[:st.steps, a:b].reshape(-1)[:st.n])
    return out


# ---------------------------------------------------------------- stored order-0 tables


def _table_bytes(counts: np.ndarray, prec: int) -> tuple[bytes, np.ndarray]:
    """Serialize counts (over symbols 0..len-1) as a precision-`prec` table; return it and its 2^16 freqs."""
    nzi = np.flatnonzero(counts)
    lo, hi = int(nzi[0]), int(nzi[-1])
    f = _quantize(counts[None, lo:hi + 1] / counts.sum(), 1 << prec)[0]
    full = np.zeros(counts.size, np.int64)
    full[lo:hi + 1] = f << (_PROB_BITS - prec)
    return bytes([lo, hi - lo, prec]) + _varints(f), full


def _read_table(r: _Reader, nsym: int) -> np.ndarray:
    lo, span, prec = r.u8(), r.u8(), r.u8()
    if lo + span >= nsym or not 1 <= prec <= _PROB_BITS:
        raise ArtifactError("rANS frequency table out of range; the artifact is damaged")
    f = np.array([r.varint() for _ in range(span + 1)], np.int64)
    if f.sum() != 1 << prec:
        raise ArtifactError("rANS frequency table does not sum to its precision; the artifact is damaged")
    full = np.zeros(nsym, np.int64)
    full[lo:lo + span + 1] = f << (_PROB_BITS - prec)
    return full


def _encode_values(v: np.ndarray) -> bytes:
    """Side information (bytes 0..255) as an order-0 table plus a length-prefixed stream."""
    table, freq = _table_bytes(np.bincount(v, minlength=256), _SIDE_PREC)
    stream = _encode_scalar(v, freq) if _lanes(v.size) <= _SCALAR_LANES else \
        _rans_encode(v, np.zeros(v.size, np.int64), freq[None])
    return table + _varints(np.array([len(stream)])) + stream


def _encode_scalar(sym: np.ndarray, freq: np.ndarray) -> bytes:
    """_rans_encode of symbols with one frequency row over few lanes, one Python step per symbol (as
    _decode_scalar): far cheaper than a numpy step over one or two lanes."""
    n, lanes = sym.size, _lanes(sym.size)
    f, cum = freq.tolist(), [0, *np.cumsum(freq).tolist()]
    syms = sym.tolist()
    x = [_LOW] * lanes
    words = []
    for first in range((n - 1) // lanes * lanes, -1, -lanes):  # the last step first, its lanes ascending
        for lane in range(min(lanes, n - first)):
            s = syms[first + lane]
            v, fs = x[lane], f[s]
            if v >= fs << 16:
                words.append(v & 0xFFFF)
                v >>= 16
            x[lane] = (v // fs << _PROB_BITS) + v % fs + cum[s]
    words.reverse()
    return np.array(x, "<u4").tobytes() + np.array(words, "<u2").tobytes()


_SCALAR_LANES = 16  # side information streams up to this many lanes are decoded in plain Python


def _decode_values(r: _Reader, n: int) -> np.ndarray:
    freq = _read_table(r, 256)
    st = _Stream(r.take(r.varint()), n, freq[None])
    sym = _decode_scalar(st) if st.lanes <= _SCALAR_LANES else _decode_streams([st])[0]
    return sym.astype(np.int16)


# ---------------------------------------------------------------- model choice


@dataclass(frozen=True)
class _CodingModel:
    """One way to code a symbol matrix: header + side bytes, the symbols, each symbol's frequency row (class),
    the frequency tables, and the ideal coded bits under them."""

    prefix: bytes
    sym: np.ndarray
    cls: np.ndarray
    freq: np.ndarray
    bits: float

    @property
    def estimated_bytes(self) -> float:
        """Blob size: the ideal bits, 4 flush bytes per lane, and the loss of 16-bit probabilities on 32-bit
        states (measured)."""
        n = self.sym.size
        return len(self.prefix) + 4 * _lanes(n) + self.bits / 8 + _RANS_LOSS * n * min(self.bits / n, 2.0)

    def encode(self) -> bytes:
        return self.prefix + _rans_encode(self.sym, self.cls, self.freq)


def _log_means(absq: np.ndarray, rows: bool, cols: bool) -> tuple[np.ndarray, np.ndarray]:
    """log2 factors of E|q_ij| ~ 2^(a_i + b_j) (alternating moment fit; -inf for all-zero lines)."""
    a_sum, b_sum = absq.sum(axis=1), absq.sum(axis=0)
    la = np.zeros(absq.shape[0])
    lb = np.zeros(absq.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(3 if rows and cols else 1):
            if rows:
                la = np.log2(a_sum / np.exp2(lb).sum())
            if cols:
                lb = np.log2(b_sum / np.exp2(la).sum())
    return la, lb


def _to_bytes(logw: np.ndarray) -> np.ndarray:
    """log2 factors -> integers in [0, 255] (1/8 octave); all-zero lines take the narrowest value."""
    finite = np.isfinite(logw)
    if not finite.any():
        return np.zeros(logw.size, np.int64)
    k = np.where(finite, np.round(logw * _OCTAVE), -np.inf)
    top = k[finite].max()
    k = np.clip(k, top - 255, top)
    return (k - k.min()).astype(np.int64)


def _median_of_sums(a: np.ndarray, b: np.ndarray) -> int:
    """int(np.median(a[:, None] + b[None, :])) for non-negative integers, from the counts of the sums (the
    convolution of the two histograms) instead of a partition of the whole matrix."""
    cumulative = np.cumsum(np.convolve(np.bincount(a), np.bincount(b)))
    n = a.size * b.size
    lo, hi = np.searchsorted(cumulative, [(n - 1) // 2, n // 2], side="right")
    return int(lo + hi) // 2


def _joint(k0: np.ndarray, sym: np.ndarray, nsym: int) -> tuple[np.ndarray, np.ndarray]:
    """Histogram hist[v, s] of (k0 = v + k0.min(), symbol) pairs, and the k0 value of each hist row."""
    lo = int(k0.min())
    hist = np.bincount((k0 - lo) * nsym + sym).astype(np.float64)
    hist = np.pad(hist, (0, -hist.size % nsym)).reshape(-1, nsym)
    return hist, np.arange(lo, lo + hist.shape[0])


def _search(hist: np.ndarray, k0v: np.ndarray, bits: int, shifts: range, nus: range) -> tuple[float, int, int]:
    """(coded bits, nu index, shift) minimizing the cost of the joint histogram: for each nu, every shift at once."""
    cls = np.clip(k0v[:, None] + np.array(shifts)[None, :], 0, _K - 1)  # [V, shifts]
    best = None
    for nu_i in nus:
        per_shift = np.einsum("vs,vts->t", hist, _parametric_cost(bits, nu_i)[cls])
        t = int(np.argmin(per_shift))  # the first of equal costs: the smallest shift
        if best is None or per_shift[t] < best[0]:
            best = (float(per_shift[t]), nu_i, shifts[t])
    return best


def _refine(sym: np.ndarray, a: np.ndarray, offset: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Move each row byte a_i by up to +-2 classes where that lowers the row's coded bits.

    sym is [R, C]; the class of element ij is a_i + offset_ij."""
    reach = max(abs(d) for d in _REFINE)
    nsym = cost.shape[1]
    # Edge rows repeated `reach` times, so that k + d never needs a clip inside the loop; a move by d reads the
    # table from row reach + d on.
    padded = np.concatenate([cost[:1]] * reach + [cost] + [cost[-1:]] * reach).astype(np.float32).ravel()
    index = np.clip(a[:, None] + offset, 0, _K - 1)
    index *= nsym
    index += sym
    best = np.zeros(a.size, np.int64)
    best_bits = padded[reach * nsym:].take(index).sum(axis=1)
    for d in _REFINE:
        row_bits = padded[(reach + d) * nsym:].take(index).sum(axis=1)
        better = row_bits < best_bits
        best[better] = d
        best_bits[better] = row_bits[better]
    return np.clip(a + best, 0, 255)


def _parametric_model(sym: np.ndarray, bits: int, rows: bool, cols: bool) -> _CodingModel:
    """t-law model with optional row and column width bytes."""
    absq = np.abs(sym - qmax(bits)).astype(np.float64)
    la, lb = _log_means(absq, rows, cols)
    a = _to_bytes(la) if rows else np.zeros(sym.shape[0], np.int64)
    b = _to_bytes(lb) if cols else np.zeros(sym.shape[1], np.int64)
    nsym = 2 * qmax(bits) + 1
    k0 = a[:, None] + b[None, :]
    mean = absq.mean()
    typical = np.log2(mean) * _OCTAVE if mean > 0 else -_K_UNIT
    centre = int(round(typical)) + _K_UNIT - _median_of_sums(a, b)
    hist, k0v = _joint(k0.ravel(), sym.ravel(), nsym)
    _, _, s0 = _search(hist, k0v, bits, range(centre - 32, centre + 33, 2), range(_NUS.index(8), _NUS.index(8) + 1))
    _, nu_i, shift = _search(hist, k0v, bits, range(s0 - 3, s0 + 4), range(len(_NUS)))
    if rows or cols:
        cost = _parametric_cost(bits, nu_i)
        for _ in range(3 if rows and cols else 1):  # alternate: the moment fit is poor for sparse residuals
            if rows:
                a = _refine(sym, a, b[None, :] + shift, cost)
            if cols:
                b = _refine(sym.T, b, a[None, :] + shift, cost)
        shift += int(a.min()) + int(b.min())
        a, b = a - a.min(), b - b.min()
        k0 = a[:, None] + b[None, :]
        hist, k0v = _joint(k0.ravel(), sym.ravel(), nsym)
        _, nu_i, shift = _search(hist, k0v, bits, range(shift - 2, shift + 3), range(len(_NUS)))
    coded, _, _ = _search(hist, k0v, bits, range(shift, shift + 1), range(nu_i, nu_i + 1))
    prefix = bytes([_KIND_PARAMETRIC, rows | cols << 1, nu_i]) + int(shift).to_bytes(2, "little", signed=True)
    if rows:
        prefix += _encode_values(a)
    if cols:
        prefix += _encode_values(b)
    return _CodingModel(prefix, sym.ravel(), np.clip(k0.ravel() + shift, 0, _K - 1), _parametric_freq(bits, nu_i),
                        coded)


def _order0_model(sym: np.ndarray, bits: int) -> _CodingModel:
    counts = np.bincount(sym.ravel(), minlength=2 * qmax(bits) + 1)
    candidates = []
    for prec in (12, 14, 16):
        table, freq = _table_bytes(counts, prec)
        with np.errstate(divide="ignore"):
            coded = float((counts * -np.log2(np.where(freq > 0, freq, 1) / _M)).sum())
        candidates.append(_CodingModel(bytes([_KIND_ORDER0]) + table, sym.ravel(), np.zeros(sym.size, np.int64),
                                       freq[None], coded))
    return min(candidates, key=lambda m: m.estimated_bytes)


def _best_model(q: np.ndarray, bits: int) -> _CodingModel:
    """Smallest of: stored order-0 table, t-law with no / row / column / row+column widths."""
    sym = q.astype(np.int64) + qmax(bits)
    candidates = [_order0_model(sym, bits)]
    candidates += [_parametric_model(sym, bits, rows, cols) for rows in (False, True) for cols in (False, True)]
    return min(candidates, key=lambda m: m.estimated_bytes)


def _plain_stream(r: _Reader, rows: int, cols: int, bits: int) -> _Stream:
    """The rest of `r` (an order-0 or parametric body) as the stream of [rows, cols] symbols (code + qmax)."""
    kind = r.u8()
    n = rows * cols
    if kind == _KIND_PARAMETRIC:
        flags, nu_i = r.u8(), r.u8()
        if flags > 3 or nu_i >= len(_NUS):
            raise ArtifactError("rANS model header out of range; the artifact is damaged")
        shift = int.from_bytes(r.take(2), "little", signed=True)
        a = _decode_values(r, rows) if flags & 1 else np.zeros(rows, np.int16)
        b = _decode_values(r, cols) if flags & 2 else np.zeros(cols, np.int16)
        st = _Stream(r.rest(), n, _parametric_freq(bits, nu_i))
        # int32 sums (not int64) keep the per-element temporaries small; the shift rides on the column vector.
        row, col = a.astype(np.int32), b.astype(np.int32) + shift
        st.cls = np.clip(row[:, None] + col[None, :], 0, _K - 1).astype(np.uint8).ravel()
        st.used = np.unique(np.clip(np.unique(row)[:, None] + np.unique(col)[None, :], 0, _K - 1))
        return st
    if kind == _KIND_ORDER0:
        freq = _read_table(r, 2 * qmax(bits) + 1)
        return _Stream(r.rest(), n, freq[None])
    raise ArtifactError(f"rANS blob kind {kind} is unknown or misplaced; the artifact is damaged")


def _signed(sym: np.ndarray, bits: int, rows: int, cols: int) -> np.ndarray:
    return (sym - np.uint8(qmax(bits))).view(np.int8).reshape(rows, cols)  # wraps to the signed code


# ---------------------------------------------------------------- near-duplicate rows


def _wrap(d: np.ndarray, r: int) -> np.ndarray:
    """Map an integer into [-r, r] modulo 2r+1 (the residual of two close codes stays small)."""
    return (d + r) % (2 * r + 1) - r


def _row_refs(q: np.ndarray, bits: int) -> np.ndarray:
    """For each row, an earlier row to predict it from (-1: none).

    Trained embeddings hold many near-identical rows (rarely seen tokens); an LZ coder finds them, a width
    model does not. Candidates are the neighbours in the order of a random projection of the rows; a row
    takes the closest earlier one (L1) when its residual's row entropy beats its own by more than the cost
    of the reference.
    """
    rows = q.shape[0]
    ref = np.full(rows, -1, np.int64)
    if rows < 2:
        return ref
    r = qmax(bits)
    x = q.astype(np.int16)  # differences of codes fit; sums are taken in int64
    probe = np.random.default_rng(0).choice(np.array([-1, 1], np.int64), q.shape[1])
    # in float64 (BLAS), exact: |projection| <= 127 x columns
    order = np.argsort(q.astype(np.float64) @ probe.astype(np.float64), kind="stable")
    index = np.arange(rows)
    best_l1 = np.full(rows, np.iinfo(np.int64).max)
    best = np.zeros(rows, np.int64)
    for o in _NEIGHBOURS:
        cand = np.empty(rows, np.int64)
        cand[order] = order[np.clip(index + o, 0, rows - 1)]
        l1 = np.abs(x - x[cand]).sum(axis=1, dtype=np.int64)
        ok = (cand < index) & (index - cand < 1 << 16) & (l1 < best_l1)
        best = np.where(ok, cand, best)
        best_l1 = np.where(ok, l1, best_l1)
    gain = row_bits(x) - row_bits(_wrap(x.astype(np.int64) - x[best], r))
    use = (best_l1 < np.iinfo(np.int64).max) & (gain > 32)
    ref[use] = best[use]
    return ref


def _encode_refs(ref: np.ndarray) -> bytes:
    """A 0/1 flag per row, then the distance back to the reference of flagged rows as low and high bytes."""
    d = (np.arange(ref.size) - ref)[ref >= 0]
    return _encode_values((ref >= 0).astype(np.int64)) + _encode_values(d & 255) + _encode_values(d >> 8)


def _decode_refs(r: _Reader, rows: int) -> np.ndarray:
    has = _decode_values(r, rows).astype(bool)
    k = int(has.sum())
    if not 0 < k < rows:
        raise ArtifactError("rANS row references are malformed; the artifact is damaged")
    dist = _decode_values(r, k).astype(np.int32) + (_decode_values(r, k).astype(np.int32) << 8)
    ref = np.full(rows, -1, np.int64)
    ref[has] = np.flatnonzero(has) - dist
    if (ref[has] < 0).any() or (dist == 0).any():
        raise ArtifactError("rANS row reference points outside the tensor; the artifact is damaged")
    return ref


def _split_parts(q: np.ndarray, bits: int, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows without a reference, and the wrapped residuals of the others."""
    has = ref >= 0
    resid = _wrap(q[has].astype(np.int64) - q[ref[has]].astype(np.int64), qmax(bits))
    return q[~has], resid.astype(np.int8)


# ---------------------------------------------------------------- public API


def _as_matrix(codes, bits: int) -> np.ndarray:
    """Validated int8 codes viewed as [-1, last dim] (a 0-D or 1-D array is one row)."""
    q = np.asarray(codes)
    if q.dtype != np.int8:
        raise OptionError(f"codes must be int8, got {q.dtype}; cast the quantized codes to int8")
    r = qmax(bits)
    if q.size and (int(q.min()) < -r or int(q.max()) > r):
        raise OptionError(f"codes lie outside [-{r}, {r}] for bits={bits}; quantize with this width first")
    return q.reshape(-1, q.shape[-1] if q.ndim else 1) if q.size else q.reshape(0, 0)


@dataclass(frozen=True)
class SizeModel:
    """What encode_codes chooses for some codes: the blob head and one coding model per coded part.

    estimated_bytes is the size of encode_codes(codes) (within ~0.3%); encode() writes it without fitting again.
    """

    bits: int
    shape: tuple[int, int]
    head: bytes  # the kind and row references of a split or empty blob (nothing for a single part)
    ref: np.ndarray | None
    parts: tuple[_CodingModel, ...]  # the whole tensor, or the unreferenced rows then the residuals

    @property
    def estimated_bytes(self) -> float:
        return _ENVELOPE + len(self.head) + self._length_bytes + sum(p.estimated_bytes for p in self.parts)

    @property
    def _length_bytes(self) -> int:
        return len(_varints(np.array([round(self.parts[0].estimated_bytes)]))) if self.ref is not None else 0

    def encode(self) -> bytes:
        if not self.parts:
            body = self.head
        elif self.ref is None:
            body = self.parts[0].encode()
        else:
            roots_blob = self.parts[0].encode()
            body = self.head + _varints(np.array([len(roots_blob)])) + roots_blob + self.parts[1].encode()
        return bytes([VERSION]) + zlib.crc32(body).to_bytes(4, "little") + body


def fit_size_model(codes, bits: int) -> SizeModel:
    """Choose the model for codes: the best single coding model, or (where rows repeat) the root/residual split."""
    bits = _check_bits(bits, OptionError)
    q = _as_matrix(codes, bits)
    if q.size == 0:
        return SizeModel(bits, q.shape, bytes([_KIND_EMPTY]), None, ())
    models = [SizeModel(bits, q.shape, b"", None, (_best_model(q, bits),))]
    ref = _row_refs(q, bits)
    if (ref >= 0).any():
        roots, resid = _split_parts(q, bits, ref)
        head = bytes([_KIND_SPLIT]) + _encode_refs(ref)
        models.append(SizeModel(bits, q.shape, head, ref, (_best_model(roots, bits), _best_model(resid, bits))))
    return min(models, key=lambda m: m.estimated_bytes)


@dataclass(frozen=True)
class SizeBreakdown:
    """Where the bytes of encode_codes go (estimates; total within ~0.3% of the real size).

    kind: "empty", "order0", "parametric" or "split"; model_bytes: header, tables and row/column/reference side
    information; payload_bytes: the ideal code length of the codes under the chosen model, so the real size
    minus model_bytes over payload_bytes measures the coder's own loss (lane states, 16-bit probabilities).
    """

    kind: str
    model_bytes: int
    payload_bytes: float
    estimated_bytes: float


_KIND_NAMES = {_KIND_ORDER0: "order0", _KIND_PARAMETRIC: "parametric"}


def size_breakdown(codes, bits: int) -> SizeBreakdown:
    m = fit_size_model(codes, bits)
    if not m.parts:
        return SizeBreakdown("empty", _ENVELOPE + len(m.head), 0.0, m.estimated_bytes)
    kind = "split" if m.ref is not None else _KIND_NAMES[m.parts[0].prefix[0]]
    model = _ENVELOPE + len(m.head) + sum(len(p.prefix) for p in m.parts)
    return SizeBreakdown(kind, model, sum(p.bits for p in m.parts) / 8, m.estimated_bytes)


def encode_codes(codes, bits: int) -> bytes:
    """Entropy-code int8 codes in [-qmax(bits), qmax(bits)] (any shape; viewed as [-1, last dim])."""
    return fit_size_model(codes, bits).encode()


def estimate_encoded_bytes(codes, bits: int) -> float:
    """Size of encode_codes(codes, bits) without running the coder (within ~0.3%)."""
    return fit_size_model(codes, bits).estimated_bytes


class _Pending:
    """A blob parsed up to its main streams (side information decoded): what decode_codes_many decodes together."""

    def __init__(self, streams: list[_Stream], finish: Callable[[list[np.ndarray]], np.ndarray]):
        self.streams, self.finish = streams, finish


def _parse(blob: bytes, shape: tuple, bits: int) -> _Pending:
    bits = _check_bits(bits, ArtifactError)
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ArtifactError(f"rANS decode got a negative shape {shape}; the manifest is damaged")
    n = int(np.prod(shape, dtype=np.int64))
    cols = shape[-1] if shape and n else 1
    rows = n // cols
    outer = _Reader(blob)
    if outer.u8() != VERSION:
        raise ArtifactError("rANS blob has an unknown version; re-create the artifact with this golfquant")
    crc = int.from_bytes(outer.take(4), "little")
    r = _Reader(outer.rest())
    if zlib.crc32(r.data) != crc:
        raise ArtifactError("rANS blob fails its CRC-32 check; the artifact is damaged")
    if n == 0:
        if r.u8() != _KIND_EMPTY or r.pos != len(r.data):
            raise ArtifactError(f"rANS blob does not hold an empty tensor of shape {shape}; the artifact is damaged")
        return _Pending([], lambda _: np.zeros(shape, np.int8))
    if r.data[r.pos:r.pos + 1] != bytes([_KIND_SPLIT]):
        return _Pending([_plain_stream(r, rows, cols, bits)],
                        lambda sym: _signed(sym[0], bits, rows, cols).reshape(shape))
    r.u8()
    ref = _decode_refs(r, rows)
    has = ref >= 0
    sub = _Reader(r.take(r.varint()))
    nroots = rows - int(has.sum())
    parts = [_plain_stream(sub, nroots, cols, bits), _plain_stream(r, rows - nroots, cols, bits)]

    def finish(sym: list[np.ndarray]) -> np.ndarray:
        q = np.empty((rows, cols), np.int16)
        q[~has] = _signed(sym[0], bits, nroots, cols)
        q[has] = _signed(sym[1], bits, rows - nroots, cols)
        # References point backwards: resolve the rows one depth at a time (a root has depth 0).
        linked = np.flatnonzero(has)
        depth = [0] * rows
        for i, j in zip(linked.tolist(), ref[linked].tolist()):
            depth[i] = depth[j] + 1
        level = np.array(depth)[linked]
        order = linked[np.argsort(level, kind="stable")]
        at = 0
        for size in np.bincount(level)[1:].tolist():
            i = order[at:at + size]
            q[i] = _wrap(q[i] + q[ref[i]], qmax(bits))
            at += size
        return q.astype(np.int8).reshape(shape)

    return _Pending(parts, finish)


def decode_codes_many(items: Sequence[tuple[bytes, tuple, int]], names: Sequence[str] | None = None
                      ) -> list[np.ndarray]:
    """decode_codes of every (blob, shape, bits), the main streams of all of them decoded together (one numpy step
    per step index across the lanes of every stream instead of one per stream). A damaged blob raises
    ArtifactError, its message prefixed with its name."""
    pending = []
    for i, (blob, shape, bits) in enumerate(items):
        label = f"{names[i]}: " if names is not None else ""
        try:
            pending.append(_parse(blob, shape, bits))
        except ArtifactError as e:
            raise ArtifactError(f"{label}{e}") from None
        for st in pending[-1].streams:
            st.label = label
    symbols = iter(_decode_streams([st for p in pending for st in p.streams]))
    return [p.finish([next(symbols) for _ in p.streams]) for p in pending]


def decode_codes(blob: bytes, shape: tuple, bits: int) -> np.ndarray:
    """Inverse of encode_codes: int8 codes of `shape`; a damaged blob raises ArtifactError."""
    return decode_codes_many([(blob, shape, bits)])[0]
