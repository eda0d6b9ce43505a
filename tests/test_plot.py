"""PNG charts: a real size report's bars, the sweep chart's cap handling, and the message without matplotlib."""
from __future__ import annotations

import sys

import pytest

from golfquant.api import quantize_checkpoint
from golfquant.errors import OptionError
from golfquant.options import QuantizeOptions
from golfquant.plan import PlanOptions
from golfquant.plot import size_report_png, sweep_png
from golfquant.report import size_report
from tests.helpers import tiny_checkpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
POINTS = [{"method": m, "total_bytes": b, "val_bpb": v} for m, b, v in
          (("rtn", 15_000_000, 1.30), ("rtn", 15_900_000, 1.25), ("auto", 15_500_000, 1.20),
           ("auto", 15_950_000, 1.18), ("gptq", 15_000_000, None))]


def _image(path):
    blob = path.read_bytes()
    assert blob.startswith(PNG_SIGNATURE) and len(blob) > 1000
    return pytest.importorskip("matplotlib.image").imread(path)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plot")
    ckpt = tiny_checkpoint(folder / "tiny.pt")
    art = folder / "tiny.gqa"
    quantize_checkpoint(ckpt, QuantizeOptions(plan=PlanOptions(mlp="int4", float_max_numel=0), method="rtn")).save(art)
    return art


@pytest.fixture(scope="module")
def report(artifact):
    return size_report(artifact, code_bytes=1234)


def test_size_report_png_from_a_real_report(report, tmp_path):
    path = size_report_png(report, tmp_path / "size.png")
    image = _image(path)
    assert image.shape[0] >= 400 and image.shape[1] >= 1200
    assert size_report_png(report, tmp_path / "again.png").read_bytes() == path.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic: no temp files left


def test_size_report_png_without_entropy_bounds(tmp_path, artifact, report):
    bare = size_report(artifact, code_bytes=1234, entropy=False)
    assert all(t.entropy is None for t in bare.tensors)
    with_bounds = _image(size_report_png(report, tmp_path / "bounds.png"))
    without = _image(size_report_png(bare, tmp_path / "bare.png"))
    assert without.shape == with_bounds.shape and (without != with_bounds).any()  # no bound bars beside the bytes


def test_sweep_png_near_and_far_from_the_cap(tmp_path):
    near = _image(sweep_png(POINTS, tmp_path / "near.png", 1.10, 16_000_000))
    far = sweep_png([p | {"total_bytes": p["total_bytes"] // 10} for p in POINTS], tmp_path / "far.png", 1.10,
                    16_000_000)
    assert near.ndim == 3 and _image(far).shape == near.shape
    assert far.read_bytes() != (tmp_path / "near.png").read_bytes()
    _image(sweep_png([], tmp_path / "empty.png", None, 16_000_000))  # nothing met its budget: still a chart


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path, report):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)
    for draw in (lambda: sweep_png(POINTS, tmp_path / "s.png", 1.1, 16_000_000),
                 lambda: size_report_png(report, tmp_path / "r.png")):
        with pytest.raises(OptionError, match=r"plotting needs matplotlib: pip install 'golfquant\[plot\]'"):
            draw()
    assert list(tmp_path.iterdir()) == []
