"""A self-contained artifact loader to paste into a challenge script (`golfquant export-loader`).

The challenge counts code bytes, so a script that cannot depend on golfquant carries its own loader. The loader
below rebuilds exactly the state_dict of `golfquant.load_artifact` (same keys, dtypes, shapes and bits) from numpy,
torch, the stdlib and the decompressors the artifact uses, and nothing else. It trusts the file: the validating
reader is `golfquant.load_artifact`, which checks every byte of a stranger's artifact. It never execs, evals or
unpickles anything from the file: the manifest is JSON, everything else is numbers. Like the library
(golfquant.codec.rans.decode_codes_many), it decodes the rANS streams of all sections together, since one numpy
step per lane step of each section was most of a load's time: every tensor is first parsed into a function that
builds it, then the queued streams are decoded in one lockstep, then the functions run.

The loader's source is kept readable here, with one block per codec and one per optional tensor feature (salient
column groups, the Hadamard rotation). `loader_source` splices in the library functions it shares (the LQER b-scale
count and A @ B, the salient columns, the rotation's inverse: float orders and indexes every dequantization path
must follow), keeps the blocks of the codecs and features asked for (an artifact without a feature pays no loader
bytes for it); the minimal form then renames every local to a short name and minifies (golfquant.codepack). Most
of this module's length is the loader's own source, one string.
"""
from __future__ import annotations

import ast
import builtins
import inspect
import itertools
import keyword
import os
import string
import textwrap
from dataclasses import dataclass, field
from typing import Iterable

from golfquant.codepack import CODECS as CODE_CODECS, PackedCode, minify, pack
from golfquant.errors import OptionError
from golfquant.quant.qtensor import lqer_b_scale_count, salient_columns
from kernels.dequant import fwht, hadamard_signs, lowrank_reference, unrotate

# Codecs the loader can decode; a block `# [name]` ... `# [end]` of _LOADER is kept only when `name` is wanted.
LOADER_CODECS = ("none", "zlib", "zstd", "brotli", "lzma", "rans")
# Tensor features only some artifacts use, in blocks like the codecs' (named as their manifest keys).
LOADER_FEATURES = ("rotate", "salient")
_BLOCK_END = "# [end]"
# Functions whose source replaces the line `# <name>` of _LOADER: one definition for the library and the loader.
_SHARED = (lqer_b_scale_count, lowrank_reference, salient_columns, hadamard_signs, fwht, unrotate)

# Mirrors golfquant/artifact.py (container and sections), golfquant/pack.py (code layouts), golfquant/codec/lz.py
# (byte codecs) and golfquant/codec/rans.py (the rANS decoder, its tables rebuilt with the same float64 operations
# in the same order so the frequencies come out identical). tests/test_export.py checks them against each other.
# The `# <name>` lines are the _SHARED functions.
_LOADER = '''
def load_artifact(path):
    """Dequantized state_dict of a golfquant artifact (docs/artifact.md); exported by `golfquant export-loader`."""
    import io, json, math
    import numpy as np
    import torch
    decoders = {}
    # [none]
    decoders['none'] = bytes
    # [end]
    # [zlib]
    import zlib
    decoders['zlib'] = zlib.decompress
    # [end]
    # [zstd]
    import zstandard
    decoders['zstd'] = zstandard.ZstdDecompressor().decompress
    # [end]
    # [brotli]
    import brotli
    decoders['brotli'] = brotli.decompress
    # [end]
    # [lzma]
    import lzma
    # raw LZMA2 (format 3, filter 33); 64 MiB covers the largest dictionary the writer uses
    decoders['lzma'] = lambda blob: lzma.decompress(blob, 3, None, [{'id': 33, 'dict_size': 1 << 26}])
    # [end]

    # <lqer_b_scale_count>

    # <lowrank_reference>
    # [salient]

    # <salient_columns>
    # [end]
    # [rotate]

    # <hadamard_signs>

    # <fwht>

    # <unrotate>
    # [end]

    def section(index):
        s = sections[index]
        raw = decoders[s['codec']](region[s['offset']:s['offset'] + s['length']])
        if s['kind'] != 'codes' and s['layout'] != 'bytes':  # shuffleK: byte k of every element, k = 0..K-1
            raw = np.frombuffer(raw, np.uint8).reshape(int(s['layout'][7:]), -1).T.tobytes()
        return raw

    def tensor_at(buf, offset, shape, dtype):
        out = torch.empty(shape, dtype=dtype)
        view = out.view(-1).view(torch.uint8).numpy()
        view[:] = np.frombuffer(buf, np.uint8, view.size, offset)
        return out

    def unpack(buf, bits, layout, shape):
        count = math.prod(shape)
        packed = np.frombuffer(buf, np.uint8)
        if layout[0] == 'i':  # int8: the signed codes themselves
            q = packed.view(np.int8)
        else:  # planes of widths 4, 2, 1 (nibble: one of width 4) of u = q + 2^(bits-1), LSB first
            widths = [4] if layout[0] == 'n' else [4] * (bits // 4) + [2] * (bits % 4 // 2) + [1] * (bits % 2)
            u = shift = start = 0
            for w in widths:
                size = -(-count * w // 8)
                plane = packed[start:start + size, None] >> np.arange(0, 8, w, dtype=np.uint8) & (1 << w) - 1
                u = u + (plane.reshape(-1)[:count].astype(np.int16) << shift)
                start += size
                shift += w
            q = (u - (1 << bits - 1)).astype(np.int8)
        if layout[-1] == 'T':  # written in the order of codes.mT
            return q.reshape(shape[:-2] + (shape[-1], shape[-2])).swapaxes(-1, -2).copy()  # copy: C order
        return q.reshape(shape)
    # [rans]
    import bisect

    def t_law(bits, nu_index):
        # frequencies (sum 2^16) of the discretized Student-t law for 160 width classes 2^((k-72)/8) x 2r+1 codes
        r = (1 << bits - 1) - 1
        k = np.arange(160)
        roots = np.array([1.0, 1.0905077326652577, 1.189207115002721, 1.2968395546510096,
                          1.4142135623730951, 1.5422108254079407, 1.681792830507429, 1.8340080864093424])
        t = (np.arange(-r, r) + 0.5)[None] / np.ldexp(roots[k % 8], k // 8 - 9)[:, None]
        nu = (2, 4, 6, 8, 12, 16, 24, 32, 64, 128)[nu_index]
        d = nu + t * t
        x = nu / d
        term = acc = np.ones_like(t)
        c = 1.0
        for j in range(1, nu // 2):
            c = c * (2 * j - 1) / (2 * j)
            term = term * x
            acc = acc + c * term
        p = np.maximum(np.diff(0.5 + t / (2.0 * np.sqrt(d)) * acc, 1, 1, 0.0, 1.0), 1e-300)
        freq = (np.floor(p * (65535 - 2 * r)) + 1).astype(np.int64)
        freq[k, freq.argmax(1)] += 65536 - freq.sum(1)
        return np.pad(freq, ((0, 0), (0, 255 - 2 * r)))  # 256 symbols, as every table here

    def lanes(data, count):
        # an interleaved rANS stream of `count` symbols (element e in lane e % lanes, 16-bit probabilities):
        # lanes, steps, the 32-bit lane states and the 16-bit words
        n = max(1, min(1024, -(-count // 8192)))
        return (n, -(-count // n), np.frombuffer(data, '<u4', n).astype(np.int64),
                np.frombuffer(data, '<u2', -1, 4 * n).astype(np.int64))

    def run():
        # decode every queued stream (data, count, frequency table, class of each symbol, classes used) into
        # symbols: all at once, one numpy step per step index across the lanes of all of them. Frequency row 0
        # gives symbol 0 all of 2^16 and so keeps a lane's state: it pads the streams of fewer steps
        heads = [lanes(job[0], job[1]) for job in jobs]
        starts = np.cumsum([0] + [h[0] for h in heads])
        block = np.zeros((max(h[1] for h in heads), starts[-1]), np.uint16)  # frequency row of every symbol
        rows, freqs = {}, [np.eye(1, 256, dtype=np.int64)[0] << 16]
        for (data, count, freq, cls, used), (n, steps, _, _), a in zip(jobs, heads, starts):
            row = np.zeros(len(freq), np.uint16)
            for c in used:
                row[c] = rows.setdefault((id(freq), c), len(freqs))
                if row[c] == len(freqs):
                    freqs.append(freq[c])
            padded = np.zeros(steps * n, np.uint16)
            padded[:count] = row[cls]
            block[:steps, a:a + n] = padded.reshape(steps, n)
        freq = np.array(freqs)
        lut = np.repeat(np.tile(np.arange(256, dtype=np.uint8), len(freq)), freq.ravel())  # 2^16 slots per row
        low = (np.cumsum(freq, 1) - freq).ravel()
        freq = freq.ravel()
        x = np.concatenate([h[2] for h in heads])
        last = np.cumsum([-1] + [len(h[3]) for h in heads[:-1]])  # the next word of each stream, minus one
        words = np.concatenate([h[3] for h in heads])
        out = np.empty(block.shape, np.uint8)
        for t in range(len(block)):
            high = block[t].astype(np.int64) << 16
            slot = x & 65535
            s = out[t] = lut.take(high | slot)
            i = high >> 8 | s
            x = freq.take(i) * (x >> 16) + slot - low.take(i)
            renorm = (x < 65536).nonzero()[0]
            # a step reads the words of a stream highest lane first
            end = renorm.searchsorted(starts)
            k = end[1:] - end[:-1]
            x[renorm] = x.take(renorm) << 16 | words.take(np.repeat(last + end[1:], k) - np.arange(renorm.size))
            last += k
        symbols.extend(out[:h[1], a:a + h[0]].ravel()[:job[1]] for job, h, a in zip(jobs, heads, starts))

    def varint(f):
        value = shift = 0
        while True:
            b = f.read(1)[0]
            value |= (b & 127) << shift
            shift += 7
            if b < 128:
                return value

    def table(f):
        lo, span, prec = f.read(3)
        freq = np.zeros((1, 256), np.int64)
        freq[0, lo:lo + span + 1] = [varint(f) << 16 - prec for _ in range(span + 1)]
        return freq

    def values(f, count):
        # side information (row and column widths, row references): one frequency row and few lanes, decoded
        # symbol by symbol in plain Python, far cheaper than numpy steps over a lane or two
        freq = table(f)[0]
        low, freq = [0, *np.cumsum(freq).tolist()], freq.tolist()
        n, _, x, words = lanes(f.read(varint(f)), count)
        x, words, out = x.tolist(), iter(words.tolist()), [0] * count
        for first in range(0, count, n):
            for e in range(min(first + n, count) - 1, first - 1, -1):  # highest lane first: the words' order
                v = x[e - first]
                slot = v & 65535
                s = out[e] = bisect.bisect(low, slot) - 1
                v = freq[s] * (v >> 16) + slot - low[s]
                x[e - first] = v << 16 | next(words) if v < 65536 else v
        return np.array(out, np.int32)

    def plain(f, rows, cols, bits):
        # queue the stream of an order-0 or t-law body for run(): its symbols will be symbols[index]
        count = rows * cols
        if f.read(1)[0] == 1:  # t law with optional row and column width bytes
            flags, nu_index = f.read(2)
            shift = int.from_bytes(f.read(2), 'little', signed=True)
            a = values(f, rows) if flags & 1 else np.zeros(rows, np.int32)
            b = values(f, cols) if flags & 2 else np.zeros(cols, np.int32)
            if (bits, nu_index) not in laws:
                laws[bits, nu_index] = t_law(bits, nu_index)
            cls = np.clip(a[:, None] + b + shift, 0, 159).astype(np.uint8).ravel()
            used = np.unique(np.clip(np.add.outer(np.unique(a), np.unique(b)) + shift, 0, 159))
            jobs.append((f.read(), count, laws[bits, nu_index], cls, used))
        else:  # stored order-0 table
            freq = table(f)
            jobs.append((f.read(), count, freq, np.zeros(count, np.uint8), [0]))
        return len(jobs) - 1

    def rans(blob, shape, bits):
        # a function giving the codes once run() has decoded the streams this queues
        count = math.prod(shape)
        if not count:
            return lambda: np.zeros(shape, np.int8)
        cols = shape[-1]
        rows = count // cols
        r = (1 << bits - 1) - 1
        f = io.BytesIO(blob[5:])  # after the version byte and the CRC-32
        if blob[5] != 3:
            i = plain(f, rows, cols, bits)
            return lambda: (symbols[i] - r).view(np.int8).reshape(shape)
        f.read(1)  # kind 3: rows flagged in `has` are wrapped residuals of an earlier row
        has = values(f, rows).astype(bool)
        n = int(has.sum())
        dist = values(f, n) + (values(f, n) << 8)
        roots = plain(io.BytesIO(f.read(varint(f))), rows - n, cols, bits)
        resid = plain(f, n, cols, bits)

        def join():
            q = np.empty((rows, cols), np.int64)
            q[~has] = (symbols[roots] - r).view(np.int8).reshape(-1, cols)
            q[has] = (symbols[resid] - r).view(np.int8).reshape(-1, cols)
            for i, j in zip(np.flatnonzero(has), np.flatnonzero(has) - dist):
                q[i] = (q[i] + q[j] + r) % (2 * r + 1) - r
            return q.astype(np.int8).reshape(shape)
        return join
    # [end]

    def codes(index, shape, bits):
        # a function giving the codes as float32 (rANS ones once run() has decoded the streams queued here)
        s = sections[index]
        # [rans]
        if s['codec'] == 'rans':
            get = rans(region[s['offset']:s['offset'] + s['length']], shape, bits)
            return lambda: torch.tensor(get(), dtype=torch.float32)
        # [end]
        return lambda: torch.tensor(unpack(section(index), bits, s['layout'], shape), dtype=torch.float32)

    def scales(ref, shape):
        return tensor_at(shared[ref['section']], ref['offset'], shape, torch.float16).float()

    def weight(t):
        # a function giving the tensor, to call once run() has decoded the rANS streams this queues
        shape = tuple(t['shape'])
        dtype = getattr(torch, t['dtype'])
        if t['kind'] == 'float':
            ref = t['data']
            w = tensor_at(shared[ref['section']], ref['offset'], shape, getattr(torch, ref['dtype']))
            return lambda: w.to(dtype)
        q = codes(t['codes'], shape, t['bits'])
        # [salient]
        sa = t.get('salient')
        if sa:  # groups of input columns with codes (main codes 0 there) and row scales of their own
            cols_s = salient_columns(sa['groups'], sa['group'])
            sq = codes(sa['codes'], shape[:-1] + (len(cols_s),), sa['bits'])
        # [end]
        lq = t['lqer']
        if lq:  # + A @ B, A with one scale, B with one scale per `group` elements of B flattened
            rank, group, cols = lq['rank'], lq['group'], shape[-1]
            a = codes(lq['a_codes'], (shape[-2], rank), lq['a_bits'])
            b = codes(lq['b_codes'], (rank, cols), lq['b_bits'])

        def get():
            w = q() * scales(t['scales'], shape[:-1])[..., None]
            # [salient]
            if sa:
                w[..., cols_s] = sq() * scales(sa['scales'], shape[:-1])[..., None]
            # [end]
            if lq:
                b_scales = scales(lq['b_scales'], (lqer_b_scale_count(rank, cols, group),))
                b_full = (b().reshape(-1) * b_scales[torch.arange(rank * cols) // group]).reshape(rank, cols)
                w = w + lowrank_reference(a() * scales(lq['a_scale'], ()), b_full)
            # [rotate]
            if 'rotate' in t:  # quantized as W·R: turned back (·Rᵀ) in fp32, before the one rounding
                w = unrotate(w, t['rotate']['block'], t['rotate']['seed'])
            # [end]
            return w.to(dtype)
        return get

    data = open(path, 'rb').read()
    n = data[6]
    size = int.from_bytes(data[n + 7:n + 11], 'little')
    manifest = json.loads(decoders[data[7:n + 7].decode()](data[n + 19:n + 19 + size]))
    region = data[n + 19 + size:]
    sections = manifest['sections']
    shared = {i: section(i) for i, s in enumerate(sections) if s['kind'] != 'codes'}
    # [rans]
    jobs, symbols, laws = [], [], {}  # queued rANS streams, their symbols, t-law tables by (bits, nu index)
    # [end]
    out = {t['name']: weight(t) for t in manifest['tensors']}
    # [rans]
    if jobs:
        run()
    # [end]
    return {name: get() for name, get in out.items()}
'''


def _splice_shared(source: str) -> str:
    """The loader with each `# <name>` line replaced by the source of that _SHARED function."""
    for fn in _SHARED:
        marker = f"    # <{fn.__name__}>\n"
        if source.count(marker) != 1:
            raise RuntimeError(f"the loader template must hold the line '# <{fn.__name__}>' once")
        source = source.replace(marker, textwrap.indent(inspect.getsource(fn), "    "))
    return source


def _check_codecs(codecs: Iterable[str] | None) -> set[str]:
    if codecs is None:
        return set(LOADER_CODECS)
    wanted = set(codecs)
    unknown = sorted(wanted - set(LOADER_CODECS))
    if unknown:
        raise OptionError(f"the exported loader cannot decode codec '{unknown[0]}': it knows {', '.join(LOADER_CODECS)}"
                          "; write the artifact with those codecs or load it with golfquant")
    if not wanted:
        raise OptionError(f"name at least one codec for the loader ({', '.join(LOADER_CODECS)})")
    return wanted


def _keep_blocks(source: str, wanted: set[str]) -> str:
    """Drop the `# [name]` ... `# [end]` blocks of codecs not wanted."""
    out, keep = [], True
    for line in source.splitlines(keepends=True):
        tag = line.strip()
        if tag == _BLOCK_END:
            keep = True
        elif tag.startswith("# [") and tag.endswith("]"):
            keep = tag[3:-1] in wanted
        elif keep:
            out.append(line)
    return "".join(out).lstrip("\n")


_SCOPE_NODES = (ast.FunctionDef, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_KEEP = frozenset({"load_artifact", "path"})  # the public name and parameter


@dataclass(eq=False)  # hashed by identity
class _Scope:
    parent: _Scope | None
    bound: dict[str, int] = field(default_factory=dict)  # name -> uses
    outer: set[tuple[_Scope, str]] = field(default_factory=set)  # enclosing scopes' variables used in this subtree
    names: dict[str, str] = field(default_factory=dict)  # name -> short name


def _scopes(tree: ast.Module) -> tuple[list[_Scope], list[tuple[ast.AST, str, _Scope | None]]]:
    """The scopes of the loader function in preorder, and every name occurrence as (node, attribute holding the
    name, scope binding it or None for builtins and globals)."""
    found: list[tuple[ast.AST, str, str, _Scope]] = []  # (node, attribute, name, scope it occurs in)

    def visit(node: ast.AST, scope: _Scope) -> None:
        if isinstance(node, _SCOPE_NODES):
            if isinstance(node, ast.FunctionDef):
                found.append((node, "name", node.name, scope))
                scope.bound.setdefault(node.name, 0)
            scope = _Scope(scope)
            scopes.append(scope)
        if isinstance(node, ast.arg):
            scope.bound.setdefault(node.arg, 0)
            found.append((node, "arg", node.arg, scope))
        elif isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Store):
                scope.bound.setdefault(node.id, 0)
            found.append((node, "id", node.id, scope))
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            raise RuntimeError("the loader template must not use global/nonlocal (the renamer does not model them)")
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    scopes = [_Scope(None)]
    for child in ast.iter_child_nodes(next(n for n in tree.body if isinstance(n, ast.FunctionDef))):
        visit(child, scopes[0])
    occurrences = []
    for node, attr, name, where in found:
        owner = where
        while owner is not None and name not in owner.bound:
            owner = owner.parent
        if owner is not None and name not in _KEEP:
            owner.bound[name] += 1
            inner = where
            while inner is not owner:  # every scope between the use and the binding sees the outer name
                inner.outer.add((owner, name))
                inner = inner.parent
        occurrences.append((node, attr, owner))
    return scopes, occurrences


def _short_names(taken: set[str]):
    """a..z, A..Z, then two-character names, skipping keywords and names taken."""
    first = string.ascii_letters
    for name in itertools.chain(first, (a + b for a in first for b in first + string.digits)):
        if name not in taken and not keyword.iskeyword(name):
            yield name


def _rename_locals(source: str) -> str:
    """Rename every variable of the loader (functions, parameters, locals; not `path`, imports or builtins) to a
    short name, scope by scope, the most used first. Sibling scopes reuse names; a scope avoids only the enclosing
    variables it uses. A consistent renaming of bound names keeps the behaviour (tests check the output)."""
    tree = ast.parse(source)
    scopes, occurrences = _scopes(tree)
    imported = {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    fixed = set(dir(builtins)) | imported | _KEEP
    fixed |= {getattr(node, attr) for node, attr, owner in occurrences if owner is None}
    for scope in scopes:  # preorder: enclosing scopes are named first
        avoid = fixed | {owner.names[name] for owner, name in scope.outer}
        order = sorted((n for n in scope.bound if n not in _KEEP), key=lambda n: (-scope.bound[n], n))
        scope.names = dict(zip(order, _short_names(avoid)))
    for node, attr, owner in occurrences:
        if owner is not None:
            setattr(node, attr, owner.names.get(getattr(node, attr), getattr(node, attr)))
    return ast.unparse(tree)


def _check_features(features: Iterable[str] | None) -> set[str]:
    wanted = set(LOADER_FEATURES if features is None else features)
    unknown = sorted(wanted - set(LOADER_FEATURES))
    if unknown:
        raise OptionError(f"the exported loader has no feature '{unknown[0]}': it knows {', '.join(LOADER_FEATURES)}")
    return wanted


def loader_source(minimal: bool = True, codecs: Iterable[str] | None = None,
                  features: Iterable[str] | None = None) -> str:
    """Python source defining `load_artifact(path) -> dict[str, torch.Tensor]` (the dequantized state_dict, original
    dtypes) for artifacts whose sections and manifest use only `codecs` (default: every codec it knows) and whose
    tensors use only `features` of LOADER_FEATURES (default: all; artifact_features names an artifact's).

    minimal: locals renamed to short names and minified (no comments); else the readable, commented source.
    Deterministic. Depends on numpy, torch, the stdlib, and zstandard / brotli only when those codecs are asked for.
    """
    # spliced first, so that the shared functions of a dropped block go with it
    source = _keep_blocks(_splice_shared(_LOADER), _check_codecs(codecs) | _check_features(features))
    if not minimal:
        return source
    return minify(_rename_locals(source), "<exported loader>", strip_annotations=True)


def packed_loader(codecs: Iterable[str] | None = None, features: Iterable[str] | None = None) -> PackedCode:
    """The minimal loader as a self-extracting `exec(...decompress(...))` line (golfquant.codepack.pack), shortest
    of the wrappers whose decompressor the loader needs anyway: lzma and zlib (stdlib), brotli only when the
    artifact uses it. Its raw_bytes are those of the minimal source."""
    wanted = _check_codecs(codecs)
    source = loader_source(True, wanted, features)
    families = [c for c in CODE_CODECS if c != "brotli" or "brotli" in wanted]
    return min((pack(source, c, name="<exported loader>") for c in families), key=lambda p: p.packed_bytes)


def artifact_codecs(path: str | os.PathLike) -> set[str]:
    """Codec names an artifact uses (its manifest's and every section's): what its loader must decode."""
    from golfquant.artifact import artifact_sizes  # validates the whole container and manifest

    info = artifact_sizes(path)
    return {info.manifest_codec, *(s.codec for s in info.sections)}


def artifact_features(path: str | os.PathLike) -> set[str]:
    """The LOADER_FEATURES an artifact's tensors use (the manifest keys they are named after): what its loader must
    rebuild beyond codes, scales and LQER."""
    from golfquant.artifact import read_manifest  # validates the whole container and manifest

    tensors = read_manifest(path)["tensors"]
    return {f for f in LOADER_FEATURES if any(f in t for t in tensors)}
