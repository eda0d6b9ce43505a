"""`golfquant train` under torchrun: 2 gloo processes on CPU against 1 process (whole micro-batches each, and
the tiny preset's one micro-batch split in two), a batch the processes cannot share, the wallclock cap under
DDP, a cross-world-size resume, and the checkpoint going through quantize and roundtrip-eval."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from golfquant.checkpoint import load_checkpoint
from golfquant.data import default_data_dir, load_tokens, write_shard
from golfquant.model import GPT, GPTConfig
from golfquant_cli.main import cli

pytestmark = pytest.mark.slow  # several processes per test: run these files first under `make test`

REPO = Path(__file__).resolve().parent.parent
BUNDLED = default_data_dir()  # the bundled train shard and tokenizer (vocab 1024)
MICRO = dict(vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, seq_len=32,
             batch_tokens=256, grad_accum_steps=2, amp="fp32", device="cpu", save_dtype="float32",
             warmdown_steps=2, muon_momentum_warmup_steps=2, val_every=2, val_max_tokens=4096)
# Same global batch, same order of tokens: 2 ranks x 1 micro-batch == 1 rank x 2 micro-batches, the same micro-batch
# shapes, and DDP's average of two gradients is the one addition that accumulation does: bit-identical in fp32.
# The tiny preset (one micro-batch of 16 sequences) on 2 ranks runs 8 sequences per rank: the same batch and the
# same mean, but the sums over its tokens are grouped differently, so it agrees to float rounding (1e-5 relative).
RTOL = 1e-5
# The tiny preset as it is (its batch of 4,096 tokens = 16 sequences of 256, one micro-batch, no micro-batching
# flag), with a 2-layer width-32 model so that a step takes milliseconds.
TINY = dict(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, amp="fp32", device="cpu", save_dtype="float32",
            val_every=2, val_max_tokens=4096)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The bundled train shard and tokenizer with a short validation split (the final eval reads all of it)."""
    root = tmp_path_factory.mktemp("data")
    for name in ("fineweb_train_000000.bin", "tokenizer.model"):
        (root / name).symlink_to(BUNDLED / name)
    write_shard(root / "fineweb_val_000000.bin", load_tokens(str(BUNDLED / "fineweb_val_*.bin"), 8193).numpy())
    return root


def _launch(data: Path, nproc: int, out: Path, *args: str, sets: dict = MICRO,
            timeout: int = 120) -> subprocess.CompletedProcess:
    flags = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    command = ["-m", "golfquant_cli.main", "train", "--data", str(data), *flags, "-o", str(out), *args]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GOLFQUANT_THREADS": "1"}
    return subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _train(data: Path, nproc: int, out: Path, *args: str, sets: dict = MICRO, timeout: int = 120) -> dict:
    done = _launch(data, nproc, out, "--json", *args, sets=sets, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])  # torchrun's banner goes to stderr


def _losses(out: dict) -> list[float]:
    return [e["train_loss"] for e in out["log"]]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("ddp")
    return root, _train(data, 1, root / "one.pt", "--steps", "4"), _train(data, 2, root / "two.pt", "--steps", "4")


def test_two_gloo_processes_match_one_process(one_and_two):
    root, one, two = one_and_two
    assert two["result"]["world_size"] == 2 and one["result"]["world_size"] == 1
    assert (one["layout"]["micro_steps"], two["layout"]["micro_steps"]) == (2, 1)  # whole micro-batches
    assert len(_losses(two)) == 4
    assert _losses(two) == _losses(one)  # bit for bit
    assert _losses(two)[-1] < _losses(two)[0] - 0.1
    # val split over the ranks and all-reduced == one process over the whole split
    assert two["log"][1]["val_bpb"] == pytest.approx(one["log"][1]["val_bpb"], rel=RTOL)
    assert two["result"]["val_bpb"] == pytest.approx(one["result"]["val_bpb"], rel=RTOL)
    a, b = load_checkpoint(root / "one.pt"), load_checkpoint(root / "two.pt")
    GPT(GPTConfig.from_dict(b.config)).load_state_dict(b.state_dict, strict=True)
    for name in a.state_dict:
        assert torch.equal(b.state_dict[name], a.state_dict[name]), name
    assert b.extra["world_size"] == 2


def test_tiny_preset_on_two_processes_splits_its_micro_batch_and_matches_one_process(data, tmp_path):
    # no micro-batching flag: 2 processes share the preset's global batch, each running half of its micro-batch
    one = _train(data, 1, tmp_path / "one.pt", "--preset", "tiny", "--steps", "4", sets=TINY)
    two = _train(data, 2, tmp_path / "two.pt", "--preset", "tiny", "--steps", "4", sets=TINY)
    for out in (one, two):
        assert (out["train"]["batch_tokens"], out["train"]["grad_accum_steps"]) == (4096, 1)  # the preset's
        assert out["result"]["train_tokens"] == 4 * 4096
    assert (one["layout"]["micro_steps"], one["layout"]["micro_seqs"]) == (1, 16)
    assert (two["layout"]["micro_steps"], two["layout"]["micro_seqs"]) == (1, 8)
    assert two["result"]["world_size"] == 2 and len(_losses(two)) == 4
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(_losses(one)), rtol=RTOL, atol=0)
    assert two["log"][1]["val_bpb"] == pytest.approx(one["log"][1]["val_bpb"], rel=RTOL)
    assert two["result"]["val_bpb"] == pytest.approx(one["result"]["val_bpb"], rel=RTOL)
    a, b = load_checkpoint(tmp_path / "one.pt"), load_checkpoint(tmp_path / "two.pt")
    assert a.extra["resume"]["data"] == b.extra["resume"]["data"]  # both read the same tokens
    # Muon orthogonalizes in bf16: gradients equal to float rounding can round one bf16 step of the update apart
    # (lr 0.04 x 2^-8 of an entry); 4 steps here stay within 3e-5 of each other.
    for name in a.state_dict:
        torch.testing.assert_close(b.state_dict[name], a.state_dict[name], rtol=0, atol=1e-4, msg=name)


def test_a_batch_two_processes_cannot_share_is_refused_in_one_line_before_any_work(data, tmp_path):
    # 768 tokens = 3 sequences of 256: not a whole number per process on 2
    done = _launch(data, 2, tmp_path / "x.pt", "--preset", "tiny", "--steps", "1",
                   sets={**TINY, "batch_tokens": 768}, timeout=60)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: batch_tokens=768 is 3 sequences of seq_len=256 per step, which 2 processes cannot share equally "
        "(1.50 each): run a process count that divides 3 (e.g. --nproc_per_node=1 or 3), or --set "
        "batch_tokens=512 or 1024 (a multiple of 512 splits into whole sequences for 2 processes and for "
        "grad_accum_steps=1)"
    ], done.stderr[-3000:]
    assert done.stdout == ""  # not even the config table
    assert not (tmp_path / "x.pt").exists()


def test_ddp_checkpoint_feeds_quantize_and_roundtrip_eval(one_and_two, data):
    root = one_and_two[0]
    runner = CliRunner()
    art = root / "two.gqa"
    res = runner.invoke(cli, ["quantize", str(root / "two.pt"), "-o", str(art), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["roundtrip-eval", str(art), "--ckpt", str(root / "two.pt"), "--json",
                              "--val", str(data / "fineweb_val_*.bin")])
    assert res.exit_code == 0, res.output
    assert "val_bpb" in res.output


def test_resume_on_two_processes_from_a_one_process_checkpoint(one_and_two, data, tmp_path):
    # the optimizer state is complete on rank 0 (Muon's momentum of every matrix), so the world size may change
    one = one_and_two[1]
    first = _train(data, 1, tmp_path / "half.pt", "--steps", "4", "--set", "stop_step=2")
    second = _train(data, 2, tmp_path / "rest.pt", "--steps", "4", "--resume", str(tmp_path / "half.pt"))
    assert [e["step"] for e in first["log"] + second["log"]] == [1, 2, 3, 4]
    assert _losses(first) + _losses(second) == _losses(one)  # bit for bit, as without the resume
    assert [e["lr_scale"] for e in second["log"]] == [e["lr_scale"] for e in one["log"][2:]]


def test_wallclock_cap_under_ddp_stops_all_ranks_and_writes_the_checkpoint(data, tmp_path):
    # A rank that kept stepping alone would hang in the next all-reduce: the subprocess timeout catches that.
    out = _train(data, 2, tmp_path / "cap.pt", "--steps", "100000", "--max-wallclock", "1.5", "--set", "val_every=0")
    result = out["result"]
    assert result["stopped_by_wallclock"] and 1 <= result["steps"] < 100_000
    ckpt = load_checkpoint(tmp_path / "cap.pt")
    GPT(GPTConfig.from_dict(ckpt.config)).load_state_dict(ckpt.state_dict, strict=True)
    assert ckpt.extra["steps"] == result["steps"] and ckpt.extra["world_size"] == 2
    assert not list(tmp_path.glob(".cap.pt.*"))  # the atomic write left no temp file
