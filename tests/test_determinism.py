"""Same checkpoint and options -> the same artifact bytes: run to run, and with 1 or 2 torch threads.

Each run is a separate process running `golfquant quantize` (GOLFQUANT_THREADS sets torch's thread count), all
started at once to share the wait. On a 32-wide tiny model, tok_emb and the MLP matrices are quantized
(--float-max-numel 2000), so GPTQ runs on matrices of 32 and 64 columns with self-generated calibration; the
budget variant measures, solves and confirms its plan for those matrices.
"""
import json

import pytest
import torch

from golfquant.artifact import read_artifact

from helpers import start_python, tiny_checkpoint

VARIANTS = {"rtn": ["--method", "rtn"],
            "gptq": ["--method", "gptq", "--calib-seqs", "2", "--calib-len", "32"],
            "budget": ["--calib-seqs", "2", "--calib-len", "32", "--budget", "30000", "--no-cache"]}
RUNS = (("a", 1), ("b", 1), ("c", 2))  # (name, threads): a vs b is run to run, a vs c is 1 vs 2 threads
# One process per run quantizes with every method in turn: separate processes (own hash seeds, fresh state) for the
# comparisons, without paying torch's import per method.
_RUN_METHODS = """
import json, sys
from golfquant_cli.main import cli
ckpt, folder, run, variants = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
for method, flags in variants.items():
    cli.main(["quantize", ckpt, "-o", f"{folder}/{method}-{run}.gqa", "--float-max-numel", "2000", *flags, "--json"])
"""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("determinism")
    ckpt = tiny_checkpoint(folder / "tiny.pt", model_dim=32, num_heads=2, num_kv_heads=1)
    procs = {run: start_python("-c", _RUN_METHODS, ckpt, folder, run, json.dumps(VARIANTS), threads=threads)
             for run, threads in RUNS}
    for run, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"run {run}: {err}"
    return {(method, run): (folder / f"{method}-{run}.gqa").read_bytes() for method in VARIANTS for run, _ in RUNS}


def _content(path_bytes: bytes, tmp_path, name: str) -> tuple[dict, dict]:
    """(tensors as comparable tuples, meta) of an artifact."""
    path = tmp_path / name
    path.write_bytes(path_bytes)
    art = read_artifact(path)
    tensors = {}
    for key, value in art.tensors.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = (value.dtype, value.view(torch.uint8).tolist() if value.numel() else [])
        else:
            tensors[key] = (value.bits, value.codes.tolist(), value.scales.view(torch.int16).tolist())
    return tensors, art.manifest["meta"]


def test_rtn_is_byte_identical(artifacts):
    assert artifacts["rtn", "a"] == artifacts["rtn", "b"], "two runs differ"
    assert artifacts["rtn", "a"] == artifacts["rtn", "c"], "1 and 2 threads differ"


def test_gptq_weights_and_meta_are_identical(artifacts, tmp_path):
    """Codes, scales and every meta field: run to run and across thread counts."""
    reference = _content(artifacts["gptq", "a"], tmp_path, "a.gqa")
    assert "gptq" in reference[1] and "calibration" in reference[1], "GPTQ with calibration did not run"
    for run, threads in RUNS[1:]:
        tensors, meta = _content(artifacts["gptq", run], tmp_path, f"{run}.gqa")
        differing = [k for k in tensors if tensors[k] != reference[0][k]]
        assert not differing, f"{threads} thread(s), run {run}: tensors {differing} differ"
        assert meta == reference[1]


def test_gptq_is_byte_identical(artifacts):
    assert artifacts["gptq", "a"] == artifacts["gptq", "b"], "two runs differ"
    assert artifacts["gptq", "a"] == artifacts["gptq", "c"], "1 and 2 threads differ"


def test_budget_is_byte_identical(artifacts, tmp_path):
    """Measurement, solve, measured confirmation and fitting choose the same artifact, whatever the threads."""
    assert "plan" in _content(artifacts["budget", "a"], tmp_path, "a.gqa")[1]
    assert artifacts["budget", "a"] == artifacts["budget", "b"], "two runs differ"
    assert artifacts["budget", "a"] == artifacts["budget", "c"], "1 and 2 threads differ"
