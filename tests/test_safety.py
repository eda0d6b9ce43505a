"""Files from strangers and interrupted writes: loading a checkpoint never runs code it carries (safetensors files
load), and writing an artifact never leaves a half-written file under its name."""
import errno
import json
import os
import pathlib
import pickle
import random
import re
import signal
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from golfquant.artifact import read_artifact, write_artifact
from golfquant.checkpoint import load_checkpoint
from golfquant.errors import CheckpointError
from golfquant_cli.main import cli

from helpers import leftovers, run_cli, tiny_state_dict


class _Opens:
    """Unpickling calls open(path, "w"): creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _Shell:
    """Unpickling runs a shell command that creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


def _payloads(tmp_path):
    """(checkpoint file, file its unpickling would create) for each way of smuggling a call into a .pt."""
    sd, config = tiny_state_dict(num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, vocab_size=64)
    cases = []
    for i, (gadget, save) in enumerate([
        (_Opens, lambda obj, p: torch.save(obj, p)),  # zip format
        (_Shell, lambda obj, p: torch.save(obj, p)),
        (_Opens, lambda obj, p: torch.save(obj, p, _use_new_zipfile_serialization=False)),  # legacy format
        (_Shell, lambda obj, p: p.write_bytes(pickle.dumps(obj))),  # a bare pickle
    ]):
        marker = tmp_path / f"pwned{i}"
        ckpt = tmp_path / f"evil{i}.pt"
        # the gadget sits inside an otherwise ordinary checkpoint, as it would in a forged final_model.pt
        save({"model": sd | {"evil": gadget(marker)}, "config": config}, ckpt)
        cases.append((ckpt, marker))
    return cases


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    for ckpt, marker in _payloads(tmp_path):
        with pytest.raises(CheckpointError, match="never runs pickled code|not a PyTorch checkpoint"):
            load_checkpoint(ckpt)
        assert not marker.exists(), f"loading {ckpt.name} ran its pickled call"


def test_quantize_cli_refuses_pickled_code(tmp_path):
    cases = _payloads(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for ckpt, marker in cases[1:]:
        res = CliRunner().invoke(cli, ["quantize", str(ckpt), "-o", str(out / "a.gqa")])
        assert res.exit_code == 2, res.output
        assert not marker.exists()
    # the real entry point: one line on stderr, nothing run, nothing written
    ckpt, marker = cases[0]
    res = run_cli("quantize", ckpt, "-o", out / "a.gqa")
    assert res.returncode == 2
    # (the blank line the progress display adds before it is test_bad_input.py::test_error_is_exactly_one_line)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "pickled code" in lines[0], res.stderr
    assert not marker.exists()
    assert leftovers(out) == []


def test_safetensors_checkpoint_loads(tmp_path):
    sd, config = tiny_state_dict(num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, vocab_size=64)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path), metadata={"golfquant_config": json.dumps(config)})
    ckpt = load_checkpoint(path)
    assert ckpt.config == config
    assert set(ckpt.state_dict) == set(sd)
    for name, t in sd.items():
        assert torch.equal(ckpt.state_dict[name], t), name


def test_damaged_checkpoint_is_a_checkpoint_error(tmp_path):
    """A truncated .pt is refused: a one-line CheckpointError naming the file. A bit flip is refused wherever it
    lands in the zip's members (their CRCs are checked, which torch does not do), the zip structure or the pickle;
    a flipped file that still loads (a flip in padding no CRC covers) holds exactly the original tensors."""
    sd, config = tiny_state_dict(num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, vocab_size=64)
    path = tmp_path / "model.pt"
    torch.save({"model": sd, "config": config}, path)
    data = path.read_bytes()
    refusal = rf"^{re.escape(str(path))}: (not a PyTorch checkpoint \(\w+\)|refused, [^\n]+|damaged[^\n]+)$"
    for n in (1, 30, 200, len(data) // 2, len(data) - 22, len(data) - 1):
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match=refusal):
            load_checkpoint(path)
    rng = random.Random(0)
    refused = 0
    for _ in range(60):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(data))] ^= rng.randint(1, 255)
        path.write_bytes(flipped)
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            assert re.match(refusal, str(e)), str(e)
            refused += 1
        else:
            assert set(ckpt.state_dict) == set(sd) and ckpt.config == config
            assert all(torch.equal(ckpt.state_dict[k], v) for k, v in sd.items()), "a damaged file loaded wrong weights"
    assert refused >= 30, f"only {refused} of 60 damaged files were refused"


def test_damaged_safetensors_is_a_checkpoint_error(tmp_path):
    sd, _ = tiny_state_dict(num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, vocab_size=64)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    data = path.read_bytes()
    for damaged in (data[:100], b"\xff" * 8 + data[8:], data[:8] + b"{not json" + data[17:]):
        path.write_bytes(damaged)
        with pytest.raises(CheckpointError):
            load_checkpoint(path)


# ------------------------------------------------------------------------------------------------ atomic writes

# A child that writes an artifact whose bytes hit the disk slowly: half, then it names its temp file and waits.
_SLOW_WRITER = """
import pathlib, sys, time, torch
from golfquant.artifact import write_artifact

def slow_write_bytes(self, data):
    with open(self, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        print(self.name, flush=True)
        time.sleep(120)
        f.write(data[len(data) // 2:])

pathlib.Path.write_bytes = slow_write_bytes
write_artifact(sys.argv[1], {"w": torch.randn(64, 64)}, None, codecs=["zlib"])
"""


def _good_artifact(path):
    write_artifact(path, {"w": torch.arange(12.0).reshape(3, 4)}, None, codecs=["zlib"])
    return path.read_bytes()


def test_killed_writer_leaves_the_old_file_or_none(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    before = _good_artifact(old / "model.gqa")
    children = {folder: subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(folder / "model.gqa")],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for folder in (old, new)}
    try:
        for folder, child in children.items():
            temp = child.stdout.readline().strip()  # the child is now mid-write
            assert temp.startswith(".model.gqa.") and temp.endswith(".tmp"), child.stderr.read()
            assert 0 < (folder / temp).stat().st_size
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            # the final name holds the old bytes or nothing; the half-written file only ever had its hidden name
            assert leftovers(folder, {temp}) == (["model.gqa"] if folder == old else [])
    finally:
        for child in children.values():
            child.kill()
            child.wait()
    assert (old / "model.gqa").read_bytes() == before
    read_artifact(old / "model.gqa")


def test_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path, monkeypatch):
    target = tmp_path / "model.gqa"
    before = _good_artifact(target)

    def disk_full(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_artifact(target, {"w": torch.randn(64, 64)}, None, codecs=["zlib"])
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == ["model.gqa"]
