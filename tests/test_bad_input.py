"""The bad-input matrix: every user mistake ends with exit code 2, one `error:` line naming the problem, no traceback,
and no output file (nor temp file) left behind; an existing artifact at the output path survives intact.

Most cases run in-process through click's CliRunner (one import of torch for all); a handful run the real entry point
in subprocesses to prove what a user sees.
"""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from golfquant.artifact import write_artifact
from golfquant.checkpoint import save_checkpoint
from golfquant_cli.main import cli

from helpers import leftovers, raw_shard, start_cli, tiny_checkpoint, tiny_state_dict, val_shard


class Inputs:
    """Every file the cases need, built once."""

    def __init__(self, d: Path):
        self.d = d
        self.ckpt = tiny_checkpoint(d / "tiny.pt")
        (d / "empty.pt").write_bytes(b"")
        (d / "text.pt").write_text("this is not a checkpoint\n")
        self.nan = self._damaged("nan.pt", "blocks.0.mlp.fc.weight", float("nan"))
        self.inf = self._damaged("inf.pt", "blocks.1.attn.c_k.weight", float("-inf"))
        sd, _ = tiny_state_dict()
        write_artifact(d / "tiny.gqa", sd, None, codecs=["zlib"])  # a float artifact of tiny.pt: fits its model
        self.narrow = tiny_checkpoint(d / "narrow.pt", model_dim=64)
        # the output-path cases fail only when writing, after quantizing: keep that work small
        self.small = tiny_checkpoint(d / "small.pt", num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1,
                                     vocab_size=64)
        for vocab in (512, 2048):  # the bundled tokenizer has 1024 pieces
            sd, config = tiny_state_dict(vocab_size=vocab)
            save_checkpoint(d / f"v{vocab}.pt", sd, config)
            write_artifact(d / f"v{vocab}.gqa", sd, None, codecs=["zlib"])
        val_shard(d / "val.bin", 300, vocab=512)
        val_shard(d / "val_beyond_tokenizer.bin", 300, vocab=2048)
        raw_shard(d / "short.bin", np.arange(4, 40))
        raw_shard(d / "magic.bin", np.arange(4, 400), magic=1234)
        raw_shard(d / "size.bin", np.arange(4, 400), count=500)
        (d / "folder_out").mkdir()

    def _damaged(self, name: str, tensor: str, value: float) -> Path:
        sd, config = tiny_state_dict()
        sd[tensor][3, 4] = value
        save_checkpoint(self.d / name, sd, config)
        return self.d / name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return Inputs(tmp_path_factory.mktemp("bad_input"))


def _roundtrip(i: Inputs, artifact: str, ckpt: str, val: str, seq_len: int = 32) -> list[str]:
    return ["roundtrip-eval", str(i.d / artifact), "--ckpt", str(i.d / ckpt), "--val", str(i.d / val),
            "--seq-len", str(seq_len)]


# id -> (arguments given the inputs and an output path, words the error line must hold)
CASES = {
    "missing-path": (lambda i, o: ["quantize", str(i.d / "nope.pt"), "-o", o], ["nope.pt", "no such file"]),
    "folder": (lambda i, o: ["quantize", str(i.d), "-o", o], ["folder"]),
    "empty-file": (lambda i, o: ["quantize", str(i.d / "empty.pt"), "-o", o], ["empty.pt", "empty"]),
    "text-file": (lambda i, o: ["quantize", str(i.d / "text.pt"), "-o", o], ["text.pt", "not a PyTorch checkpoint"]),
    "nan-weights": (lambda i, o: ["quantize", str(i.nan), "-o", o], ["'blocks.0.mlp.fc.weight'", "1 NaN"]),
    "inf-weights": (lambda i, o: ["quantize", str(i.inf), "-o", o], ["'blocks.1.attn.c_k.weight'", "1 Inf"]),
    "rule-matches-nothing": (lambda i, o: ["quantize", str(i.ckpt), "-o", o, "--rule", "blocks\\.9\\.=int4"],
                             ["blocks\\.9\\.", "matches no"]),
    "mlp-int9": (lambda i, o: ["quantize", str(i.ckpt), "-o", o, "--mlp", "int9"], ["int9", "int2..int8"]),
    "mlp-int1": (lambda i, o: ["quantize", str(i.ckpt), "-o", o, "--mlp", "int1"], ["int1", "int2..int8"]),
    "sdclip-0": (lambda i, o: ["quantize", str(i.ckpt), "-o", o, "--clip", "sdclip:0"], ["sdclip:0", "> 0"]),
    "sdclip-negative": (lambda i, o: ["quantize", str(i.ckpt), "-o", o, "--clip", "sdclip:-1"], ["sdclip:-1", "> 0"]),
    "out-is-a-folder": (lambda i, o: ["quantize", str(i.small), "-o", str(i.d / "folder_out")],
                        ["folder_out", "folder"]),
    "out-under-a-file": (lambda i, o: ["quantize", str(i.small), "-o", str(i.d / "text.pt" / "a.gqa")],
                         ["text.pt", "cannot write"]),
    "budget-not-a-number": (lambda i, o: ["size-report", str(i.d / "tiny.gqa"), "--budget", "abc"],
                            ["'abc'", "not a number"]),
    "artifact-not-an-artifact": (lambda i, o: ["size-report", str(i.d / "text.pt")], ["text.pt", "not a golfquant"]),
    "artifact-shapes-differ": (lambda i, o: _roundtrip(i, "tiny.gqa", "narrow.pt", "val.bin"),
                               ["does not match the model", "(1, 128)", "(1, 64)"]),
    "tokenizer-larger-than-model": (lambda i, o: _roundtrip(i, "v512.gqa", "v512.pt", "val.bin"),
                                    ["1024 pieces", "512"]),
    "shard-shorter-than-a-sequence": (lambda i, o: _roundtrip(i, "tiny.gqa", "tiny.pt", "short.bin", 64),
                                      ["fewer than one sequence", "65"]),
    "shard-bad-magic": (lambda i, o: _roundtrip(i, "tiny.gqa", "tiny.pt", "magic.bin"), ["magic.bin", "bad magic"]),
    "shard-wrong-size": (lambda i, o: _roundtrip(i, "tiny.gqa", "tiny.pt", "size.bin"), ["size.bin", "500 tokens"]),
}


@pytest.fixture(scope="module")
def results(inputs):
    """Each case run once in-process: (result, its output folder)."""
    out = {}
    for name, (make_args, _) in CASES.items():
        folder = inputs.d / f"out-{name}"
        out[name] = (CliRunner().invoke(cli, make_args(inputs, str(folder / "a.gqa"))), folder)
    return out


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_cleanly(name, results, inputs):
    res, folder = results[name]
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    assert "Traceback" not in res.stderr + res.stdout
    line = _error_line(res.stderr)
    assert line.startswith("error: ") and line.count("error:") == 1, res.stderr
    for words in CASES[name][1]:
        assert words in line, f"{words!r} not in {line!r}"
    assert not folder.exists() or leftovers(folder) == []
    assert leftovers(inputs.d / "folder_out") == []
    assert (inputs.d / "text.pt").is_file()


@pytest.mark.parametrize("name", CASES)
def test_error_is_exactly_one_line(name, results):
    res, _ = results[name]
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), repr(res.stderr)


def test_failed_quantize_keeps_the_existing_artifact(inputs, tmp_path):
    good = tmp_path / "model.gqa"
    sd, _ = tiny_state_dict()
    write_artifact(good, {"w": sd["blocks.0.mlp.fc.weight"]}, None, codecs=["zlib"])
    before = good.read_bytes()
    for args in (["quantize", str(inputs.nan)], ["quantize", str(inputs.ckpt), "--mlp", "int9"]):
        res = CliRunner().invoke(cli, [*args, "-o", str(good)])
        assert res.exit_code == 2
        assert good.read_bytes() == before
        assert leftovers(tmp_path) == ["model.gqa"]


def test_tokenizer_smaller_than_model_is_accepted(inputs):
    """The lead's rule (data.check_tokenizer_fits): a tokenizer may be smaller than the model's vocab; its byte tables
    are padded and the ids beyond it count as boundaries of 0 bytes."""
    res = CliRunner().invoke(cli, _roundtrip(inputs, "v2048.gqa", "v2048.pt", "val.bin") + ["--json"])
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert math.isfinite(summary["quantized"]["val_bpb"]) and summary["bytes"] > 0
    assert summary["quantized"]["val_bpb"] == summary["float"]["val_bpb"]  # a float artifact: the same weights


def test_tokens_beyond_the_tokenizer_are_refused(inputs):
    res = CliRunner().invoke(cli, _roundtrip(inputs, "v2048.gqa", "v2048.pt", "val_beyond_tokenizer.bin"))
    assert res.exit_code == 2
    assert "tokenizer" in _error_line(res.stderr)


def test_unreachable_budget_names_the_smallest_size(inputs, tmp_path):
    res = CliRunner().invoke(cli, ["quantize", str(inputs.ckpt), "-o", str(tmp_path / "a.gqa"), "--budget", "1000"])
    line = _error_line(res.stderr)
    assert res.exit_code == 2 and "No such option" not in line
    assert "budget" in line.lower() and re.search(r"\d{4,}", line.replace(",", ""))
    # no artifact; the measurement stays, complete, for the next try with a larger budget
    assert leftovers(tmp_path) == ["a.calibration.safetensors", "a.measurement.json"]


def test_real_entry_point_prints_one_error_line(inputs, tmp_path):
    """The installed entry point, not CliRunner: exit code 2, an `error:` line, no traceback, nothing written."""
    names = ["nan-weights", "budget-not-a-number", "shard-bad-magic"]
    procs = {n: start_cli(*CASES[n][0](inputs, str(tmp_path / n / "a.gqa"))) for n in names}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert all(words in lines[0] for words in CASES[name][1]), (name, lines[0])
        assert not (tmp_path / name).exists()
        if name == "budget-not-a-number":  # no progress display in size-report: exactly one line today
            assert err.count("\n") == 1
