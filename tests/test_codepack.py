"""golfquant.codepack and `golfquant pack-code`: minify without renaming, self-extracting wrapper, smoke check."""
from __future__ import annotations

import ast
import json
import lzma
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from golfquant import codepack
from golfquant.codepack import check_packed, code_size, minify, pack
from golfquant.errors import OptionError
from golfquant_cli.pack_code_cmd import pack_code

GOLFQUANT = Path(codepack.__file__).parent

# A stdlib-only script shaped like a record's train_gpt.py: env-driven hyperparameters, classes, nested functions,
# decorators, f-strings, docstrings and comments everywhere, awkward tokens, and a __main__ guard.
TRAIN_SCRIPT = r'''"""
Toy trainer shaped like train_gpt.py. The docstring and the comments must vanish; nothing else may change.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
from dataclasses import dataclass, field

# -----------------------------
# HYPERPARAMETERS
# -----------------------------

class Hyperparameters:
    # Paths and sizes come from the environment, like the challenge's script.
    data_path = os.environ.get("DATA_PATH", "./data/datasets/fineweb10B_sp1024")
    train_files = os.path.join(data_path, "fineweb_train_*.bin")
    seed = int(os.environ.get("SEED", 1337))
    num_layers = int(os.environ.get("NUM_LAYERS", 9))
    model_dim = int(os.environ.get("MODEL_DIM", 512))
    matrix_lr = float(os.environ.get("MATRIX_LR", 0.04))
    adam_eps = float(os.environ.get("ADAM_EPS", 1e-8))
    tie_embeddings = bool(int(os.environ.get("TIE_EMBEDDINGS", "1")))


CONTROL_TENSOR_NAME_PATTERNS = tuple(
    pattern
    for pattern in os.environ.get(
        "CONTROL_TENSOR_NAME_PATTERNS",
        "attn_scale,mlp_scale,resid_mix,q_gain,skip_weights",
    ).split(",")
    if pattern
)
INT8_CLIP_PERCENTILE = 99.99984
INT8_CLIP_Q = INT8_CLIP_PERCENTILE / 100.0
MAGIC, VERSION = 20240520, 1
HEX, BIG, HALF, SMALL = 0x1F, 1_000_000, .5, 1.
CPLX = 2.5j
SPACE_PIECE = "▁"
TEMPLATE = """step:{step}
    loss:{loss:.4f}
  (indented lines inside a string stay as they are)
"""
RAW = r"C:\no\escape" + b"bytes\x00".decode("latin-1") + u"unicode"


def zeropower(values: list[float], steps: int = 5, eps: float = 1e-7) -> list[float]:
    """Newton-Schulz stand-in: normalize, then iterate a quintic."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    norm = math.sqrt(sum(v * v for v in values)) + eps
    x = [v / norm for v in values]
    for _ in range(steps):
        x = [a * v + b * v ** 3 + c * v ** 5 for v in x]  # elementwise, unlike the real thing
    return x


def ramp(step: int, *, warmup: int = 10, total: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    elif step >= total:
        return 0.0
    else:
        return max(0.0, (total - step) / (total - warmup))


def counter():
    count = 0

    def bump(by=1):
        nonlocal count
        count += by
        return count

    return bump


def logged(prefix):
    """Decorator with an argument."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            result = fn(*args, **kwargs)
            inner.calls.append(f"{prefix}:{fn.__name__}{args!r}={result!r}")
            return result
        inner.calls = []
        return inner
    return wrap


@logged("lut")
def piece_bytes(piece: str) -> int:
    if piece.startswith(SPACE_PIECE):
        piece = piece[1:]
    return len(piece.encode("utf-8"))


@functools.lru_cache(maxsize=None)
def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


@dataclass
class Config:
    """Only fields here."""
    vocab_size: int = 1024
    layers: list[int] = field(default_factory=lambda: [1, 2, 3])

    @property
    def head_dim(self) -> int:
        return self.vocab_size // 8

    @staticmethod
    def parse(text: str) -> "Config":
        return Config(**json.loads(text))

    @classmethod
    def default(cls) -> "Config":
        return cls()


class Empty:
    """A class whose body is only a docstring."""


class Muon:
    def __init__(self, params, lr: float, momentum: float = 0.95, nesterov: bool = True):
        self.params = list(params)
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.state = {}

    def step(self, grads):
        "A single-quoted docstring."
        for i, (p, g) in enumerate(zip(self.params, grads)):
            buf = self.state.setdefault(i, 0.0)
            buf = buf * self.momentum + g
            self.state[i] = buf
            if self.nesterov:
                g = g + self.momentum * buf
            self.params[i] = p - self.lr * g
        return self.params


def tricky_tokens():
    x = 1 .real + (2).imag
    y = 2 ** -1
    z = [*range(3), *[4, 5]]
    w = {**{"a": 1}, "b": 2}
    v = not-1
    u = list(range(10))[::-2] + list(range(5))[:-1]
    t = (n := 7) * 2
    s = x if x else-1
    r, = [HEX]
    q = lambda: -1
    p = 1 if y==0.5 else 0
    o = -x if True else ...
    total = x + y + \
        t + s
    return [x, y, z, w, v, u, t, s, r, q(), p, o is Ellipsis, total, n]


def fstrings(step=3, loss=2.718281828):
    name = "val"
    nested = f"{name!r:>8}|{loss:.3f}|{{braces}}|{'inner'}|{f'{step:03d}'}"
    multi = f"""{name}
  {step}"""
    return [nested, multi, TEMPLATE.format(step=step, loss=loss), f"{step=}"]


def control_flow(n):
    out = []
    i = 0
    while i < n:
        i += 1
        if i % 2:
            continue
        out.append(i)
    else:
        "while-else holding only a string"
    for j in range(3):
        if j == 5:
            break
    else:
        out.append(-1)
    try:
        out.append(1 // (n - n))
    except ZeroDivisionError as e:
        out.append(type(e).__name__)
    else:
        out.append("no error")
    finally:
        "a finally holding only a string"
    try:
        pass
    finally:
        out.append("finally")
    with open(os.devnull) as f, open(os.devnull) as g:
        out.append(f.closed or g.closed)
    global LAST
    LAST = len(out)
    return out


def match_shape(item):
    match item:
        case {"kind": "bank", **rest}: return f"bank {sorted(rest)}"
        case [first, *others]:
            return f"list {first} +{len(others)}"
        case Config(vocab_size=1024) | None: return "default"
        case _: pass
    return "other"


def selftest():
    """Deterministic output the packed script must reproduce exactly."""
    args = Hyperparameters()
    random.seed(args.seed)
    print("hyper", args.data_path, args.train_files, args.num_layers, args.model_dim, args.matrix_lr, args.adam_eps,
          args.tie_embeddings)
    print("patterns", CONTROL_TENSOR_NAME_PATTERNS, INT8_CLIP_Q, MAGIC, VERSION, HEX, BIG, HALF, SMALL, CPLX)
    print("template", repr(TEMPLATE), repr(RAW))
    print("zeropower", [round(v, 6) for v in zeropower([random.random() for _ in range(4)])])
    print("ramp", [round(ramp(s), 4) for s in (0, 5, 50, 99, 150)])
    bump = counter(); bump(); bump(5)
    print("counter", bump())
    print("pieces", [piece_bytes(p) for p in ("▁the", "abc", "▁é")], piece_bytes.calls)
    print("fib", fib(30), fib.cache_info().hits > 0)
    cfg = Config.parse('{"vocab_size": 4096}')
    print("config", cfg, cfg.head_dim, Config.default(), dataclasses.asdict(cfg), Empty.__name__)
    opt = Muon([1.0, 2.0], lr=0.1)
    for _ in range(3):
        opt.step([0.5, -0.25])
    print("muon", [round(p, 6) for p in opt.params], Muon.step.__qualname__)
    print("tricky", tricky_tokens())
    print("fstrings", fstrings())
    print("flow", control_flow(6), LAST)
    print("match", [match_shape(x) for x in ({"kind": "bank", "a": 1}, [1, 2, 3], None, Config(), 4.5)])


def main():
    print("main", Hyperparameters.num_layers, __name__)
    selftest()


if __name__ == "__main__":
    main()
'''


def _run(path: Path, *flags: str, env_extra: dict | None = None, entry: str | None = None) -> str:
    """stdout of running `path` as __main__, or of calling `entry` after importing it under another name."""
    env = dict(os.environ, NUM_LAYERS="3", PYTHONDONTWRITEBYTECODE="1", **(env_extra or {}))
    if entry is None:
        cmd = [sys.executable, *flags, str(path)]
    else:
        call = f"import runpy; runpy.run_path({str(path)!r}, run_name='lib')['{entry}']()"
        cmd = [sys.executable, *flags, "-c", call]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _payload(packed_text: str) -> bytes:
    """Whatever the wrapper hands to exec, captured by running the wrapper with `exec` shadowed."""
    captured = []
    exec(packed_text, {"exec": captured.append})
    return captured[0]


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "train_gpt.py"
    path.write_text(TRAIN_SCRIPT, encoding="utf-8")
    return path


def _without_strings(source: str) -> ast.Module:
    """Independent of codepack: the AST with every string statement removed and empty blocks given a `pass`."""
    tree = ast.parse(source)
    for node in list(ast.walk(tree)):
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                kept = [s for s in block if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                 and isinstance(s.value.value, str))]
                setattr(node, name, kept or [ast.Pass()])
    return tree


def _strip_strings_dump(source: str) -> str:
    return ast.dump(_without_strings(source))


def test_minify_preserves_ast_and_drops_comments_docstrings():
    out = minify(TRAIN_SCRIPT)
    assert _strip_strings_dump(out) == _strip_strings_dump(TRAIN_SCRIPT)
    assert "HYPERPARAMETERS" not in out and "Newton-Schulz stand-in" not in out and "single-quoted" not in out
    assert "\n\n" not in out and not re.search(r"[ \t]\n", out)
    assert "    loss:{loss:.4f}\n  (indented lines" in out  # multi-line string kept verbatim
    assert len(out) < 0.75 * len(TRAIN_SCRIPT)


def test_minify_exact_output_of_a_small_module():
    src = '''"""Module doc."""; import os
def f(x):
    """Doc."""
    # comment
    if x:
        return 1
    y = x + 1  # trailing
    z = y * 2
    "dead string"
    return z
class A:
    """Only a docstring."""
if os.sep: "s"
'''
    assert minify(src) == "import os\ndef f(x):\n if x:return 1\n y=x+1;z=y*2;return z\nclass A:pass\nif os.sep:pass\n"


def test_minify_keeps_tokens_apart_where_needed():
    src = "a = 1 .real\nb = 2 ** -1\nc = a if a else-1\nd = [1] [0]\ne = not-1\nf = 3 if a==1 else 4\ng = r'x'\n"
    out = minify(src)
    assert "1 .real" in out and "2**-1" in out and "else-1" in out and "a==1 else" in out
    namespace: dict = {}
    exec(out, namespace)
    assert [namespace[k] for k in "abcdefg"] == [1, 0.5, 1, 1, False, 3, "x"]


def test_strip_annotations_drops_only_parameter_and_return_annotations():
    src = ("def f(x: int, y: (list[int]) = (1,), *a: 'str', k: dict = {}, **kw: int) -> (tuple[int, int]):\n"
           "    z: int = 1\n    return lambda q: q\n"
           "async def g(a,\n            b: int = 2,  # c\n            ) -> None: pass\n")
    expected = "def f(x,y=(1,),*a,k={},**kw):z:int=1;return lambda q:q\nasync def g(a,b=2,):pass\n"
    assert minify(src, strip_annotations=True) == expected
    assert "x:int" in minify(src) and "->(tuple[int,int])" in minify(src)


def test_syntax_error_is_an_option_error():
    with pytest.raises(OptionError, match=r"bad\.py: not valid Python \(line 1"):
        minify("def f(:\n", name="bad.py")


def test_packed_script_behaves_like_the_original(script, tmp_path):
    packed = pack(TRAIN_SCRIPT)
    assert packed.packed_bytes == len(packed.text.encode()) < packed.minified_bytes < packed.raw_bytes
    assert packed.raw_bytes == len(TRAIN_SCRIPT.encode())
    assert "\n" not in packed.text and packed.text.isascii()
    out = tmp_path / "packed.py"
    out.write_text(packed.text)
    expected = _run(script)
    assert expected.startswith("main 3 __main__") and "zeropower" in expected  # NUM_LAYERS came from the env
    assert _run(out) == expected
    assert _run(out, entry="selftest") == _run(script, entry="selftest")
    stripped = pack(TRAIN_SCRIPT, strip_annotations=True)
    assert stripped.minified_bytes < packed.minified_bytes
    out.write_text(stripped.text)
    assert _run(out) == expected  # dataclass fields are class-level annotations: kept


@pytest.mark.parametrize("codec", ["lzma", "zlib"])
def test_stdlib_codecs_need_no_site_packages(script, tmp_path, codec):
    packed = pack(TRAIN_SCRIPT, codec)
    assert packed.codec == codec and packed.text.startswith(f"import {codec},base64;")
    out = tmp_path / f"packed_{codec}.py"
    out.write_text(packed.text)
    assert _run(out, "-I", "-S") == _run(script)  # -S: no site-packages, so only the stdlib is importable


def test_every_wrapper_candidate_decodes():
    data = minify(TRAIN_SCRIPT).encode()
    wrappers = [*codepack._lzma_wrappers(data), *codepack._zlib_wrappers(data), *codepack._brotli_wrappers(data)]
    assert len(wrappers) == 11
    for text in wrappers:
        assert _payload(text) == data


def test_best_is_the_shortest_and_deterministic():
    sizes = {c: pack(TRAIN_SCRIPT, c).packed_bytes for c in codepack.CODECS}
    best = pack(TRAIN_SCRIPT)
    assert best.packed_bytes == min(sizes.values()) and sizes[best.codec] == best.packed_bytes
    assert pack(TRAIN_SCRIPT).text == best.text
    with pytest.raises(OptionError, match="unknown code codec 'zstd'"):
        pack(TRAIN_SCRIPT, "zstd")


def test_token_minifier_beats_ast_unparse_after_compression():
    """The design choice, measured: re-emitting tokens is smaller than ast.unparse with a 1-space indent."""

    def unparse_minify(source: str) -> str:  # string statements removed by the same rule: only formatting differs
        text = ast.unparse(_without_strings(source))
        return re.sub(r"(?m)^((?:    )+)", lambda m: " " * (len(m.group(1)) // 4), text)

    ours = theirs = 0
    for path in sorted(GOLFQUANT.rglob("*.py")):
        source = path.read_text()
        ours += len(lzma.compress(minify(source).encode(), preset=9 | lzma.PRESET_EXTREME))
        theirs += len(lzma.compress(unparse_minify(source).encode(), preset=9 | lzma.PRESET_EXTREME))
    print(f"golfquant/ minified+lzma: tokens {ours} B, ast.unparse {theirs} B")
    assert ours < theirs


@pytest.mark.parametrize("path", sorted(GOLFQUANT.rglob("*.py")), ids=lambda p: str(p.relative_to(GOLFQUANT)))
def test_real_modules_round_trip(path):
    source = path.read_text()
    packed = pack(source, name=str(path))
    payload = _payload(packed.text)
    assert _strip_strings_dump(payload.decode()) == _strip_strings_dump(source)
    assert packed.minified_bytes == len(payload) <= packed.raw_bytes
    minify(source, str(path), strip_annotations=True)  # raises if the AST (annotations aside) changed


def test_check_packed_accepts_a_faithful_pack(script):
    check_packed(script, pack(TRAIN_SCRIPT).text)


def test_check_packed_names_what_differs(script):
    changed = TRAIN_SCRIPT.replace("INT8_CLIP_PERCENTILE = 99.99984", "INT8_CLIP_PERCENTILE = 99.9")
    changed = changed.replace("def fstrings(", "def fstrings_renamed(")
    with pytest.raises(OptionError) as e:
        check_packed(script, pack(changed).text)
    message = str(e.value)
    assert "\n" not in message
    assert "missing fstrings" in message and "extra fstrings_renamed" in message
    assert "INT8_CLIP_PERCENTILE: constant 99.99984 -> constant 99.9" in message


def test_check_packed_times_out_and_reports_import_failures(tmp_path):
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ntime.sleep(30)\n")
    with pytest.raises(OptionError, match="took over 1 s"):
        check_packed(slow, pack(slow.read_text()).text, timeout=1)
    broken = tmp_path / "broken.py"
    broken.write_text("import golfquant_no_such_module\n")
    with pytest.raises(OptionError, match="importing the original script failed.*golfquant_no_such_module"):
        check_packed(broken, pack(broken.read_text()).text)


def test_code_size(script):
    assert code_size(script, packed=False) == len(TRAIN_SCRIPT.encode())
    assert code_size(script, packed=True) == pack(TRAIN_SCRIPT).packed_bytes
    with pytest.raises(OptionError, match="no such file"):
        code_size(script.parent / "missing.py", packed=True)


def test_cli_writes_the_packed_script_and_reports_json(script, tmp_path):
    out = tmp_path / "out" / "packed.py"
    result = CliRunner().invoke(pack_code, [str(script), "-o", str(out), "--json", "--codec", "lzma"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    packed = pack(TRAIN_SCRIPT, "lzma")
    assert summary == {"raw_bytes": packed.raw_bytes, "minified_bytes": packed.minified_bytes,
                       "packed_bytes": packed.packed_bytes, "codec": "lzma", "out": str(out), "checked": True}
    assert out.read_text() == packed.text
    table = CliRunner().invoke(pack_code, [str(script), "-o", str(out), "--no-check"])
    assert table.exit_code == 0 and f"{packed.raw_bytes:,}" in table.output


@pytest.mark.parametrize("content", ["def f(:\n", None])
def test_cli_bad_input_writes_nothing(tmp_path, content):
    src = tmp_path / "train_gpt.py"
    if content is not None:
        src.write_text(content)
    out = tmp_path / "packed.py"
    result = CliRunner().invoke(pack_code, [str(src), "-o", str(out)])
    assert isinstance(result.exception, OptionError)
    assert not out.exists() and not list(tmp_path.glob(".packed.py.*"))
