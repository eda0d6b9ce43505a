"""The in-memory entry point: a model or a state_dict in, the same artifact bytes as the CLI out."""
from __future__ import annotations

import pytest
import torch

import golfquant
from golfquant.calib import CalibConfig
from golfquant.checkpoint import load_checkpoint
from golfquant.factory import build_model
from golfquant.options import QuantizeOptions
from golfquant.plan import PlanOptions

from helpers import run_cli, tiny_checkpoint

CALIB = CalibConfig(seqs=2, seq_len=16)  # the CLI defaults but for these two
FLAGS = ["--calib-seqs", "2", "--calib-len", "16"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("api") / "mini.pt", num_layers=1, model_dim=64, vocab_size=256,
                           num_heads=2, num_kv_heads=1)


@pytest.mark.parametrize("flags, options", [
    (["--mlp", "int4", "--float-max-numel", "0"], QuantizeOptions(plan=PlanOptions(mlp="int4", float_max_numel=0),
                                                                 calib=CALIB)),
    (["--budget", "30000", "--no-cache"], QuantizeOptions(calib=CALIB, budget=30000))])
def test_model_in_memory_gives_the_cli_bytes(ckpt, tmp_path, flags, options):
    cli = run_cli("quantize", ckpt, "-o", tmp_path / "cli.gqa", *FLAGS, *flags, "--json", timeout=300)
    assert cli.returncode == 0, cli.stderr
    loaded = load_checkpoint(ckpt)
    model = build_model(loaded.state_dict, loaded.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = golfquant.quantize(model, options, meta={"checkpoint": ckpt.name})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was
    assert result.data == (tmp_path / "cli.gqa").read_bytes()
    from_sd = golfquant.quantize(loaded.state_dict, options, config=loaded.config, meta={"checkpoint": ckpt.name})
    assert from_sd.data == result.data
    result.save(tmp_path / "api.gqa")
    assert (tmp_path / "api.gqa").read_bytes() == result.data and result.info.path == tmp_path / "api.gqa"
    assert result.total_bytes == len(result.data) and result.reports and set(result.plan) == set(loaded.state_dict)
    state = golfquant.load_artifact(tmp_path / "api.gqa")
    for name, value in result.tensors.items():
        expected = value.dequantize() if hasattr(value, "dequantize") else value.float()
        assert torch.equal(state[name].float(), expected.float()), name


def test_manifest_records_the_resolved_k_of_bare_sdclip(ckpt):
    """Bare sdclip takes the records' k for each role at its width: int8 embeddings 20 (the 04-05 record)."""
    plan = PlanOptions(mlp="int6", attn="int6", embed="int8", float_max_numel=0)
    result = golfquant.quantize_checkpoint(ckpt, QuantizeOptions(plan=plan, clip="sdclip", method="rtn"))
    assert result.meta["clip_k"] == {"embed": {"8": 20.0}, "mlp": {"6": 12.0}, "attn": {"6": 13.0}}
