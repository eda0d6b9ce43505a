"""Code-size golf: minify a training script and wrap it in a self-extracting `exec(decompress(b85decode(...)))` line.

The challenge counts code bytes + compressed model bytes, and records ship `train_gpt.py` as such a wrapper.
The minifier renames nothing (names are behaviour: env vars, getattr, state-dict keys); it drops comments, string
statements (docstrings and other dead string literals), blank lines and optional spaces, indents one space per level
and joins simple statements. Its result must parse to the original's AST, string statements aside, or it raises.
The tokenizer-level minifier and the wrapper live together: the wrapper's size is the minifier's objective.
"""
from __future__ import annotations

import ast
import base64
import bisect
import io
import json
import lzma
import os
import subprocess
import sys
import tempfile
import token
import tokenize
import zlib
from dataclasses import dataclass
from pathlib import Path

from golfquant import codec as byte_codecs
from golfquant.atomic import atomic_write_text
from golfquant.errors import OptionError

# Codecs whose decompressor a challenge script can import: lzma and zlib are stdlib; the challenge image has brotli.
CODECS = ("lzma", "brotli", "zlib")

_BLOCK_FIELDS = ("body", "orelse", "finalbody")
_SIMPLE_STATEMENTS = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.Pass, ast.Break,
                      ast.Continue, ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal, ast.Raise, ast.Assert,
                      ast.Delete)
_OPERATORS = frozenset(token.EXACT_TOKEN_TYPES)
_LZMA_DICT = 1 << 23  # liblzma's default LZMA2 dictionary: what the raw-LZMA2 wrapper's decoder gets
_FSTRING_START = getattr(token, "FSTRING_START", None)  # Python >= 3.12 tokenizes f-strings piecewise
_FSTRING_END = getattr(token, "FSTRING_END", None)


# ---------------------------------------------------------------------------------------------------------------------
# Minifier


def _is_string_statement(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _blocks(tree: ast.AST):
    """Every statement list of the tree (bodies, else and finally branches, handler and case bodies)."""
    for node in ast.walk(tree):
        for field in _BLOCK_FIELDS:
            block = getattr(node, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                yield node, field, block


def _annotated(tree: ast.AST):
    """(function, annotation) for every parameter and return annotation."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = fn.args
            for arg in (*a.posonlyargs, *a.args, a.vararg, *a.kwonlyargs, a.kwarg):
                if arg is not None and arg.annotation is not None:
                    yield arg, arg.annotation
            if fn.returns is not None:
                yield fn, fn.returns


def _canonical_dump(tree: ast.Module, strip_annotations: bool) -> str:
    """ast.dump with string statements removed (a block left empty holds `pass`), and parameter and return
    annotations if asked: what minify must preserve."""
    for node, field, block in list(_blocks(tree)):
        setattr(node, field, [s for s in block if not _is_string_statement(s)] or [ast.Pass()])
    for owner, _ in list(_annotated(tree)) if strip_annotations else ():
        setattr(owner, "returns" if isinstance(owner, ast.stmt) else "annotation", None)
    return ast.dump(tree)


def _parse(source: str, name: str) -> ast.Module:
    try:
        return ast.parse(source, filename=name)
    except SyntaxError as e:
        raise OptionError(f"{name}: not valid Python (line {e.lineno}: {e.msg}); fix the source first") from None
    except ValueError as e:  # NUL bytes
        raise OptionError(f"{name}: not valid Python ({e}); fix the source first") from None


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_" or ord(ch) > 127


def _needs_space(prev: tuple[int, str], cur: tuple[int, str]) -> bool:
    """Whether two tokens written side by side would tokenize differently."""
    (ptype, ptext), (ctype, ctext) = prev, cur
    if _is_word(ptext[-1]) and (_is_word(ctext[0]) or ctype == token.NUMBER):
        return True
    if ptype == token.NUMBER and (ctext[0] == "." or _is_word(ctext[0])):
        return True  # `1 .real`, `1 if`
    if ptype == token.NAME and ctype == token.STRING and set(ptext) <= set("rbufRBUF"):
        return True  # `r "x"` must not become the raw string `r"x"`
    if ptype == token.OP and ctype == token.OP:
        joined = ptext + ctext[0]
        return any(op.startswith(joined) for op in _OPERATORS)  # `* *` vs `**`, `= =` vs `==`, `. .` vs `...`
    return False


def _source_span(lines: list[str], start: tuple[int, int], end: tuple[int, int]) -> str:
    if start[0] == end[0]:
        return lines[start[0] - 1][start[1]:end[1]]
    return lines[start[0] - 1][start[1]:] + "".join(lines[start[0]:end[0] - 1]) + lines[end[0] - 1][:end[1]]


def _tokens(source: str, lines: list[str]):
    """(type, text, start) tokens; an f-string tokenized piecewise (Python >= 3.12) becomes one STRING token holding its
    exact source text."""
    nesting, start = 0, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == _FSTRING_START:
            nesting += 1
            start = start or tok.start
        elif nesting:
            if tok.type == _FSTRING_END:
                nesting -= 1
                if not nesting:
                    yield token.STRING, _source_span(lines, start, tok.end), start
                    start = None
        else:
            yield tok.type, tok.string, tok.start


@dataclass
class _Line:
    depth: int
    text: str
    simple: bool  # starts with a simple statement, so holds only simple statements
    header: bool  # ends with ':' (a compound statement whose body follows)


def _annotation_spans(tokens: list, tree: ast.Module, position) -> list[tuple]:
    """Drop spans of parameter and return annotations: from their `:` or `->` through any closing parentheses."""
    starts = [start for _, _, start in tokens]
    spans = []
    for _, annotation in _annotated(tree):
        i = bisect.bisect_left(starts, position(annotation.lineno, annotation.col_offset))
        parens = 0
        while tokens[i - 1][1] == "(":  # `x: (int)`: the node's span leaves out its parentheses
            i, parens = i - 1, parens + 1
        j = bisect.bisect_left(starts, position(annotation.end_lineno, annotation.end_col_offset)) + parens
        spans.append((starts[i - 1], starts[j], False))  # starts[i - 1] is the `:` or `->`
    return spans


def _logical_lines(source: str, tree: ast.Module, strip_annotations: bool) -> list[_Line]:
    """Re-emit `source` token by token: no comments, blank lines or string statements (nor annotations, if asked),
    minimal spaces.

    Multi-line tokens (triple-quoted strings) are copied verbatim; backslash and bracket continuations are joined.
    """
    lines = source.splitlines(keepends=True)

    def position(lineno: int, byte_col: int) -> tuple[int, int]:  # AST columns count UTF-8 bytes, tokenize's chars
        return lineno, len(lines[lineno - 1].encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))

    simple_starts = {position(s.lineno, s.col_offset) for s in ast.walk(tree) if isinstance(s, _SIMPLE_STATEMENTS)}
    drops = []  # (start, end, becomes_pass): a block holding only strings keeps a `pass`
    for _, _, block in _blocks(tree):
        only_strings = all(_is_string_statement(s) for s in block)
        drops += [(position(s.lineno, s.col_offset), position(s.end_lineno, s.end_col_offset), only_strings and i == 0)
                  for i, s in enumerate(block) if _is_string_statement(s)]
    tokens = [t for t in _tokens(source, lines) if t[0] not in (token.COMMENT, token.NL)]
    if strip_annotations:
        drops += _annotation_spans(tokens, tree, position)
    drops.sort()
    out: list[_Line] = []
    line: list[tuple[int, str]] = []
    depth = line_depth = d = 0
    simple = after_drop = False
    for ttype, text, start in tokens:
        if ttype == token.INDENT:
            depth += 1
        elif ttype == token.DEDENT:
            depth -= 1
        elif ttype == token.NEWLINE:
            while line and line[-1] == (token.OP, ";"):
                line.pop()
            if line:
                out.append(_Line(line_depth, _join(line), simple, line[-1] == (token.OP, ":")))
            line, after_drop = [], False
        elif ttype != token.ENDMARKER:
            while d < len(drops) and drops[d][1] <= start:
                d += 1
            dropped = d < len(drops) and drops[d][0] <= start
            if dropped and not (start == drops[d][0] and drops[d][2]):
                after_drop = True
                continue
            if after_drop and text == ";":
                after_drop = False
                continue
            after_drop = False
            if not line:
                line_depth, simple = depth, start in simple_starts or dropped
            line.append((token.NAME, "pass") if dropped else (ttype, text))
    return out


def _join(line: list[tuple[int, str]]) -> str:
    parts = [line[0][1]]
    for prev, cur in zip(line, line[1:]):
        parts.append(" " + cur[1] if _needs_space(prev, cur) else cur[1])
    return "".join(parts)


def _join_statements(lines: list[_Line]) -> list[_Line]:
    """`a\\nb` -> `a;b` for simple statements of one block; `if c:\\n a` -> `if c:a` for a one-line simple body."""
    merged: list[_Line] = []
    for ln in lines:
        if merged and merged[-1].simple and ln.simple and merged[-1].depth == ln.depth:
            merged[-1].text += ";" + ln.text
        else:
            merged.append(_Line(ln.depth, ln.text, ln.simple, ln.header))
    out: list[_Line] = []
    i = 0
    while i < len(merged):
        ln = merged[i]
        body = merged[i + 1] if i + 1 < len(merged) else None
        body_ends = i + 2 >= len(merged) or merged[i + 2].depth <= ln.depth
        if ln.header and body is not None and body.simple and body.depth == ln.depth + 1 and body_ends:
            out.append(_Line(ln.depth, ln.text + body.text, False, False))
            i += 2
        else:
            out.append(ln)
            i += 1
    return out


def minify(source: str, name: str = "<source>", strip_annotations: bool = False) -> str:
    """Smaller source with the same behaviour. Raises OptionError on a syntax error; RuntimeError if the result's AST
    differs (a golfquant bug: pack the unminified source instead).

    strip_annotations drops parameter and return annotations (pyminify's default, ~4% fewer packed bytes): only code
    that reads them (torch.jit.script, functools.singledispatch, typing.get_type_hints) behaves differently."""
    tree = _parse(source, name)
    lines = _join_statements(_logical_lines(source, tree, strip_annotations))
    out = "".join(" " * ln.depth + ln.text + "\n" for ln in lines)
    expected = _canonical_dump(tree, strip_annotations)
    if _canonical_dump(_parse(out, f"{name} (minified)"), strip_annotations) != expected:
        raise RuntimeError(f"{name}: minifying changed the program's AST (a golfquant bug)")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Self-extracting wrapper


@dataclass(frozen=True)
class PackedCode:
    text: str  # the packed script: one line, ASCII
    codec: str  # one of CODECS
    raw_bytes: int  # UTF-8 bytes of the source
    minified_bytes: int
    packed_bytes: int  # UTF-8 bytes of `text`: what the challenge counts


def _wrap(module: str, blob: bytes, args: str = "") -> str:
    # b85 has no quote or backslash characters, so the payload is a plain str literal (b85decode takes ASCII str).
    payload = base64.b85encode(blob).decode("ascii")
    return f'import {module},base64;exec({module}.decompress(base64.b85decode("{payload}"){args}))'


def _lzma_wrappers(data: bytes):
    # lc (literal context bits) is tuned per input: code text is neither int8 codes (lc=0) nor prose (lc=3).
    for lc in range(4):
        opts = {"preset": 9 | lzma.PRESET_EXTREME, "lc": lc, "lp": 0, "pb": 0, "dict_size": _LZMA_DICT}
        # .lzma ("alone"): a 13-byte header that plain lzma.decompress recognizes.
        yield _wrap("lzma", lzma.compress(data, format=lzma.FORMAT_ALONE, filters=[{"id": lzma.FILTER_LZMA1, **opts}]))
        # Raw LZMA2: no header, but the call must name the format (3 = FORMAT_RAW) and filter (33 = FILTER_LZMA2).
        raw = lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, **opts}])
        yield _wrap("lzma", raw, ',3,None,[{"id":33}]')


def _zlib_wrappers(data: bytes):
    yield _wrap("zlib", byte_codecs.compress(data, "zlib"))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15, 9)  # raw deflate: 6 header/checksum bytes fewer, 4 chars more
    yield _wrap("zlib", deflate.compress(data) + deflate.flush(), ",-15")


def _brotli_wrappers(data: bytes):
    yield _wrap("brotli", byte_codecs.compress(data, "brotli"))


_WRAPPERS = {"lzma": _lzma_wrappers, "brotli": _brotli_wrappers, "zlib": _zlib_wrappers}


def pack(source: str, codec: str = "best", name: str = "<source>", strip_annotations: bool = False) -> PackedCode:
    """Minify `source` and wrap it in the shortest `exec(decompress(b85decode(...)))` line over the chosen codec(s).

    Deterministic: ties go to the first candidate (lzma before brotli before zlib)."""
    if codec != "best" and codec not in CODECS:
        raise OptionError(f"unknown code codec '{codec}': use best, {', '.join(CODECS)}")
    minified = minify(source, name, strip_annotations)
    data = minified.encode("utf-8")
    if len(data) > _LZMA_DICT:
        raise OptionError(f"{name}: {len(data):,} bytes after minifying; packing handles scripts up to {_LZMA_DICT:,}")
    candidates = [(text, family) for family in (CODECS if codec == "best" else (codec,))
                  for text in _WRAPPERS[family](data)]
    text, family = min(candidates, key=lambda c: len(c[0]))  # min keeps the first of equal lengths
    return PackedCode(text=text, codec=family, raw_bytes=len(source.encode("utf-8")), minified_bytes=len(data),
                      packed_bytes=len(text.encode("utf-8")))


def read_source(path: str | os.PathLike) -> str:
    """A Python file's text, honouring a BOM or coding cookie; OptionError if missing or undecodable."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding)
    except FileNotFoundError:
        raise OptionError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise OptionError(f"{p}: is a folder, expected a Python file") from None
    except (SyntaxError, UnicodeDecodeError, LookupError) as e:
        raise OptionError(f"{p}: cannot decode as Python source ({e}); save it as UTF-8") from None


def code_size(path: str | os.PathLike, packed: bool, strip_annotations: bool = False) -> int:
    """Counted code bytes of a script: its file size, or the size of its packed wrapper."""
    if not packed:
        if not Path(path).is_file():
            raise OptionError(f"{path}: no such file")
        return Path(path).stat().st_size
    return pack(read_source(path), name=str(path), strip_annotations=strip_annotations).packed_bytes


# ---------------------------------------------------------------------------------------------------------------------
# Import smoke test

# Run in a fresh interpreter: import the script under a name other than __main__ (so its entry point does not run)
# and describe every top-level name: modules, classes (with their attribute names), functions (with their parameter
# names), simple constants (with their repr), other objects (with their type).
_PROBE = r"""
import importlib.util, inspect, json, sys, types
path, out, root = sys.argv[1:4]
sys.path.insert(0, root)
spec = importlib.util.spec_from_file_location("golfquant_probe", path)
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module  # as an import does: dataclasses and pickle look the module up
spec.loader.exec_module(module)
def simple(v):
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        return True
    return isinstance(v, (tuple, list)) and all(simple(x) for x in v)
def describe(v):
    if isinstance(v, types.ModuleType):
        return "module " + v.__name__
    if isinstance(v, type):
        return "class " + ",".join(sorted(k for k in vars(v) if not k.startswith("__")))
    if callable(v):
        try:
            return "function(" + ",".join(inspect.signature(v).parameters) + ")"
        except (TypeError, ValueError):
            return "callable " + type(v).__name__
    return "constant " + repr(v) if simple(v) else "object " + type(v).__name__
names = {k: describe(v) for k, v in vars(module).items() if not (k.startswith("__") and k.endswith("__"))}
with open(out, "w") as f:
    json.dump(names, f)
"""


def _run_probes(scripts: dict[str, Path], root: Path, workdir: Path, timeout: float) -> dict[str, dict[str, str]]:
    """Probe each script in its own subprocess (all at once); kill and raise on timeout or failure.

    Like `python train_gpt.py`, each sees the original's folder first on sys.path; the working folder is ours."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # no __pycache__ beside the user's script
    procs = {}
    for label, script in scripts.items():
        cmd = [sys.executable, "-c", _PROBE, str(script), str(workdir / f"{label}.json"), str(root)]
        procs[label] = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
    try:
        errors = {label: p.communicate(timeout=timeout)[1] for label, p in procs.items()}
    except subprocess.TimeoutExpired:
        raise OptionError(f"importing the scripts took over {timeout:.0f} s (does the script do work at import "
                          "time?); pass --no-check to skip the smoke test") from None
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for label, p in procs.items():
        if p.returncode != 0:
            last = (errors[label].strip().splitlines() or [f"exit code {p.returncode}"])[-1]
            raise OptionError(f"importing the {label} script failed ({last}); fix it or pass --no-check")
    return {label: json.loads((workdir / f"{label}.json").read_text()) for label in scripts}


def _describe_difference(original: dict[str, str], packed: dict[str, str]) -> str:
    extra_allowed = {*CODECS, "base64"} - set(original)  # the wrapper's own imports
    missing = sorted(set(original) - set(packed))
    extra = sorted(set(packed) - set(original) - extra_allowed)
    changed = sorted(k for k in set(original) & set(packed) if original[k] != packed[k])
    parts = []
    if missing:
        parts.append("missing " + ", ".join(missing[:5]))
    if extra:
        parts.append("extra " + ", ".join(extra[:5]))
    parts += [f"{k}: {original[k][:60]} -> {packed[k][:60]}" for k in changed[:3]]
    return "; ".join(parts)


def check_packed(original_path: str | os.PathLike, packed_text: str, timeout: float = 120.0) -> None:
    """Import smoke test: the packed script compiles and, imported as a module in a subprocess, defines the same
    top-level names (and simple constant values) as the original. OptionError on any difference."""
    original = Path(original_path).resolve()
    try:
        compile(packed_text, "<packed>", "exec")
    except SyntaxError as e:
        raise OptionError(f"the packed script does not compile ({e.msg}); a golfquant bug, pass --no-check") from None
    with tempfile.TemporaryDirectory(prefix="golfquant-packcheck-") as tmp:
        work = Path(tmp)
        atomic_write_text(work / "packed.py", packed_text)
        found = _run_probes({"original": original, "packed": work / "packed.py"}, original.parent, work, timeout)
    difference = _describe_difference(found["original"], found["packed"])
    if difference:
        raise OptionError(f"the packed script's top-level names differ from {original.name}: {difference}")
