"""The rate-distortion sweep on a tiny model: every point fits its budget, sweep.json and sweep.png are written."""
from __future__ import annotations

import json

import pytest

from golfquant.calib import CalibConfig
from golfquant.checkpoint import load_checkpoint
from golfquant.errors import OptionError
from golfquant.plot import sweep_png
from golfquant.sweep import STEP_RANGE, SizeCurve, SweepOptions, int8_bytes, sweep, uniform_setting
from tests.helpers import TOKENIZER, tiny_checkpoint, val_shard

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    return tiny_checkpoint(folder / "tiny.pt"), val_shard(folder / "val.bin", 2_000), folder


def _opts(tiny, **kw) -> SweepOptions:
    _, val, folder = tiny
    return SweepOptions(val_pattern=str(val), tokenizer=str(TOKENIZER), out_dir=folder / "out", max_tokens=1_000,
                        float_max_numel=0, calib=CalibConfig(seqs=4, seq_len=32), **kw)


def test_sweep_points_fit_their_budgets_and_files_are_written(tiny):
    ckpt = tiny[0]
    reference = int8_bytes(load_checkpoint(ckpt).state_dict, 0)
    budgets = (round(0.3 * reference), round(0.45 * reference))
    opts = _opts(tiny, budgets=budgets, methods=("gptq", "auto"))
    result = sweep(ckpt, opts)
    assert len(result.points) == 4
    for p in result.points:
        assert p.error is None, p.error
        assert p.total_bytes <= p.budget
        assert p.total_bytes >= 0.9 * p.budget  # pushed to the budget, not merely under it
        assert p.val_bpb > 0 and abs(p.gap_bpb - (p.val_bpb - result.float_bpb)) < 1e-12
    data = json.loads((opts.out_dir / "sweep.json").read_text())
    assert data["budgets"] == sorted(budgets) and data["budgets_from"] == "given"
    assert {"checkpoint", "float_bpb", "eval_tokens", "code_bytes", "int8_bytes", "cap", "points"} <= set(data)
    assert {"method", "budget", "artifact", "artifact_bytes", "total_bytes", "val_bpb", "gap_bpb", "bits",
            "pruned_codes", "error"} <= set(data["points"][0])
    assert sorted((p["method"], p["budget"]) for p in data["points"]) == sorted(
        (m, b) for m in ("gptq", "auto") for b in budgets)
    for p in result.points:  # the kept artifact is the one measured; attempts left nothing behind
        assert (opts.out_dir / "artifacts").joinpath(p.artifact.split("/")[-1]).stat().st_size == p.artifact_bytes
    assert not [f for f in (opts.out_dir / "artifacts").iterdir() if f.name.startswith(".")]

    png = sweep_png(data["points"], opts.out_dir / "sweep.png", data["float_bpb"], data["cap"])
    blob = png.read_bytes()
    assert blob.startswith(PNG_SIGNATURE) and len(blob) > 1000
    image = pytest.importorskip("matplotlib.image").imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    again = sweep_png(data["points"], opts.out_dir / "again.png", data["float_bpb"], data["cap"])
    assert again.read_bytes() == blob  # no timestamps in the PNG


def test_unreachable_budget_is_a_point_with_an_error(tiny):
    result = sweep(tiny[0], _opts(tiny, budgets=(2_000,), methods=("rtn",)))
    (point,) = result.points
    assert point.error and "2,000" in point.error and point.val_bpb is None and point.artifact is None


def test_default_budgets_are_fractions_of_the_int8_bytes_and_count_the_code(tiny):
    _, _, folder = tiny
    reference = int8_bytes(load_checkpoint(tiny[0]).state_dict, 0)
    code = folder / "train_gpt.py"
    code.write_text("x = 1\n" * (reference // 12 + 1))  # more than half the int8 bytes: no default budget is left
    result = sweep(tiny[0], _opts(tiny, methods=("rtn", "auto"), code_path=code))
    assert result.budgets_from == "fractions of int8_bytes"
    assert result.budgets == sorted(round(f * reference) for f in (0.25, 0.35, 0.5))
    assert result.code_bytes == code.stat().st_size
    assert len(result.points) == 6 and all("code bytes alone" in p.error for p in result.points)


def test_uniform_setting_keeps_the_step_and_bounds_the_clip():
    a, b = uniform_setting(0.999), uniform_setting(1.0)
    assert (a.bits, b.bits) == (6, 5)
    # across a width switch the step (k / qmax) barely moves: the clip range halves with the width
    ka, kb = (float(s.clip.split("mlp=")[1].split(",")[0]) for s in (a, b))
    assert kb / ka == pytest.approx(0.5, rel=0.01)
    assert uniform_setting(STEP_RANGE[0]).bits == 8 and uniform_setting(STEP_RANGE[1]).bits == 2


def test_size_curve_decreases_and_solves_within_the_grid(tiny):
    sd = load_checkpoint(tiny[0]).state_dict
    curve = SizeCurve(sd, 0)
    assert all(x >= y for x, y in zip(curve.bytes, curve.bytes[1:]))
    target = 0.5 * (curve.bytes[0] + curve.bytes[-1])
    t = curve.solve(target)
    assert curve.estimate(t) == pytest.approx(target, rel=1e-6)
    assert curve.solve(10 * curve.bytes[0]) == STEP_RANGE[0]


def test_bad_options_name_the_fix(tiny):
    with pytest.raises(OptionError, match="use one or more of"):
        sweep(tiny[0], _opts(tiny, methods=("fast",)))
    with pytest.raises(OptionError, match="positive"):
        sweep(tiny[0], _opts(tiny, budgets=(0,)))
