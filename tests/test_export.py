import ast
import json

import pytest
import torch
from click.testing import CliRunner

from golfquant.artifact import artifact_sizes, load_artifact, write_artifact
from golfquant.errors import OptionError
from golfquant.export import LOADER_CODECS, artifact_codecs, loader_source, packed_loader
from golfquant.pack import LAYOUTS
from golfquant.quant.qtensor import LowRankFactors, QuantizedTensor
from golfquant_cli.export_loader_cmd import export_loader

BYTE_CODECS = ("none", "zlib", "zstd", "brotli", "lzma")


def _codes(g, shape, bits, row_spread=True):
    """Roughly Gaussian codes whose spread varies by row and column (what the rANS width model is for)."""
    r = 2 ** (bits - 1) - 1
    rows = torch.rand(shape[:-1] + (1,), generator=g) * 2 + 0.2 if row_spread else 1.0
    cols = torch.rand(shape[-1], generator=g) + 0.5
    q = torch.randn(shape, generator=g) * rows * cols * max(r, 1) / 3
    return q.round().clamp(-r, r).to(torch.int8)


def _quant(g, shape, bits, lqer=None):
    return QuantizedTensor(_codes(g, shape, bits), (torch.rand(shape[:-1], generator=g) * 0.01).half(), bits, lqer)


def tensors():
    g = torch.Generator().manual_seed(0)
    out = {f"w{bits}": _quant(g, (12 + bits, 20 + bits), bits) for bits in range(2, 9)}
    out["bank"] = _quant(g, (3, 8, 10), 5)
    out["big"] = _quant(g, (130, 131), 6)  # above 16,384 codes: 3 interleaved rANS lanes, last step partial
    dup = _codes(g, (40, 64), 4)
    dup[20:] = dup[:20]  # near-identical rows: the rANS split (kind 3)
    dup[25, 3] = 0
    out["dup"] = QuantizedTensor(dup, torch.full((40,), 0.02).half(), 4)
    out["skew"] = QuantizedTensor((torch.rand(30, 40, generator=g) < 0.93).to(torch.int8), torch.ones(30).half(), 2)
    spread = torch.rand(8500, 1, generator=g) ** 3 * 3 + 0.05  # rows of very different spread: row widths coded
    tall = (torch.randn(8500, 8, generator=g) * spread * 10).round().clamp(-31, 31).to(torch.int8)
    out["tall"] = QuantizedTensor(tall, torch.full((8500,), 0.01).half(), 6)  # 8,500 row widths: 2 rANS lanes
    out["tiny"] = QuantizedTensor(torch.tensor([[1, -1, 0]], dtype=torch.int8), torch.ones(1).half(), 2)
    out["lq"] = _quant(g, (16, 24), 4, LowRankFactors(
        a_codes=_codes(g, (16, 3), 3), a_scale=torch.tensor(0.01).half(), a_bits=3,
        b_codes=_codes(g, (3, 24), 6), b_scales=(torch.rand(4, generator=g) * 0.01).half(), b_bits=6, group=20))
    out["fp32"] = torch.randn(7, generator=g)
    out["fp16"] = torch.randn(3, 5, generator=g).half()
    out["bf16"] = torch.randn(9, generator=g).bfloat16()
    out["scalar"] = torch.tensor(2.5)
    out["steps"] = torch.tensor([7, -8], dtype=torch.int64)
    out["mask"] = torch.tensor([True, False, True])
    out["empty"] = torch.zeros(0, 4)
    return out


def exported(source):
    namespace = {}
    exec(compile(source, "<exported>", "exec"), namespace)
    return namespace["load_artifact"]


def assert_same_state_dict(got, want):
    assert list(got) == list(want)
    for name, w in want.items():
        t = got[name]
        assert (t.dtype, t.shape) == (w.dtype, w.shape) and t.is_contiguous(), name
        assert torch.equal(t.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), name  # bit for bit


@pytest.fixture(scope="module")
def sample():
    return tensors()


@pytest.fixture(scope="module")
def artifacts(sample, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    paths = {}
    for codec in BYTE_CODECS:
        paths[codec] = folder / f"{codec}.gqa"
        write_artifact(paths[codec], sample, None, codecs=[codec])
    paths["rans"] = folder / "rans.gqa"
    write_artifact(paths["rans"], sample, None, codecs=["rans", "zlib"])
    return paths


@pytest.mark.parametrize("codec", BYTE_CODECS + ("rans",))
def test_exported_loader_rebuilds_load_artifact(artifacts, codec):
    path = artifacts[codec]
    used = artifact_codecs(path)
    assert codec in {s.codec for s in artifact_sizes(path).sections}
    assert_same_state_dict(exported(loader_source(True, used))(str(path)), load_artifact(path))


def test_rans_artifact_exercises_every_decoder_branch(artifacts):
    blob = artifacts["rans"].read_bytes()
    info = artifact_sizes(artifacts["rans"])
    start = info.header_bytes + info.manifest_bytes
    kinds, flags = set(), set()
    for s in info.sections:
        at = start + sum(x.length for x in info.sections[:s.index])
        if s.codec == "rans":
            kinds.add(blob[at + 5])
            if blob[at + 5] == 1:
                flags.add((blob[at + 6], s.name))
    assert {1, 2, 3} <= kinds  # parametric, stored order-0 (skew), near-duplicate row split (dup)
    assert 3 in {f for f, _ in flags}  # t law with row and column widths
    assert any(f & 1 for f, name in flags if name == "codes:tall")  # row widths in two lanes (plain Python path)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_code_layout(sample, tmp_path, layout):
    path = tmp_path / "a.gqa"
    layouts = [layout] if "nibble" not in layout else [layout, "int8"]  # nibble holds at most 4 bits
    write_artifact(path, sample, None, codecs=["none"], layouts=layouts)
    assert layout in {s.layout for s in artifact_sizes(path).sections}
    assert_same_state_dict(exported(loader_source(True, artifact_codecs(path)))(path), load_artifact(path))


def test_readable_and_packed_forms_load_the_same(artifacts):
    path = artifacts["rans"]
    want = load_artifact(path)
    assert_same_state_dict(exported(loader_source(False))(path), want)
    packed = packed_loader(artifact_codecs(path))
    assert packed.text.startswith("import ") and "\n" not in packed.text
    assert_same_state_dict(exported(packed.text)(path), want)
    assert packed_loader({"lzma", "rans"}).text.startswith(("import lzma,", "import zlib,"))  # no brotli import


def _imports(source):
    tree = ast.parse(source)
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))
    return names, tree


def test_imports_only_numpy_torch_stdlib_and_the_named_codecs():
    base = {"io", "json", "math", "numpy", "torch"}
    modules = {"none": set(), "zlib": {"zlib"}, "zstd": {"zstandard"}, "brotli": {"brotli"}, "lzma": {"lzma"},
               "rans": {"bisect"}}
    for codecs in [{"brotli", "rans"}, {"zlib"}, {"zstd", "none"}, {"lzma"}, set(LOADER_CODECS)]:
        for minimal in (True, False):
            names, tree = _imports(loader_source(minimal, codecs))
            assert names == base | set().union(*(modules[c] for c in codecs))
            called = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
            assert not called & {"exec", "eval", "compile", "__import__"} and "load" not in attrs  # no torch.load
    assert "def rans" not in loader_source(False, {"zlib"}) and "def rans" in loader_source(False, {"rans", "zlib"})


def test_deterministic_and_smaller_for_fewer_codecs():
    assert loader_source(True, ["rans", "brotli"]) == loader_source(True, {"brotli", "rans"})
    assert loader_source() == loader_source(True, LOADER_CODECS)
    full, subset = loader_source(), loader_source(True, {"brotli", "rans"})
    assert len(subset) < len(full) < len(loader_source(False))
    assert len(loader_source(True, {"brotli"})) < len(subset)
    assert packed_loader({"brotli"}).text == packed_loader({"brotli"}).text


def test_a_loader_without_the_codec_fails_loudly(artifacts):
    load = exported(loader_source(True, artifact_codecs(artifacts["zlib"]) - {"zlib"} | {"lzma"}))
    with pytest.raises(KeyError, match="zlib"):
        load(artifacts["zlib"])


def test_unknown_or_no_codec_is_an_option_error():
    with pytest.raises(OptionError, match="cannot decode codec 'lz4'"):
        loader_source(True, {"lz4"})
    with pytest.raises(OptionError, match="at least one"):
        loader_source(True, set())


def test_cli_writes_prints_and_reports(artifacts, tmp_path):
    runner = CliRunner()
    path = artifacts["rans"]
    out = tmp_path / "loader.py"
    result = runner.invoke(export_loader, ["--artifact", str(path), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["codecs"] == sorted(artifact_codecs(path)) and summary["out"] == str(out)
    assert summary["bytes"] == len(out.read_bytes()) == summary["minified_bytes"]
    assert summary["packed_bytes"] < summary["minified_bytes"] < summary["raw_bytes"]
    assert_same_state_dict(exported(out.read_text())(path), load_artifact(path))

    printed = runner.invoke(export_loader, ["--packed"])
    assert printed.exit_code == 0
    assert printed.output == packed_loader().text + "\n"

    readable = runner.invoke(export_loader, ["--readable", "--json"])
    assert json.loads(readable.output)["source"] == loader_source(False)
    assert runner.invoke(export_loader, ["--readable", "--packed"]).exit_code != 0
