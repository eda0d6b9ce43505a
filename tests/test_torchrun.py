"""quantize, roundtrip-eval and sweep under `torchrun --nproc_per_node=2` (gloo on CPU) against one process: the
same artifact bytes, the same val_bpb, one JSON object, files written once, and one error for a failing rank."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO, tiny_checkpoint, val_shard

pytestmark = pytest.mark.slow  # several processes per test: run these files first under `make test`

# Calibration in 4 batches of one sequence, so that both processes generate and accumulate Hessians.
CALIB = ["--calib-seqs", "4", "--calib-len", "32", "--calib-batch", "1"]


def _run(nproc: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    command = ["-m", "golfquant_cli.main", *args]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GOLFQUANT_THREADS": "1"}
    return subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _json(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout  # one JSON object: rank 1 printed nothing
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    return root, tiny_checkpoint(root / "tiny.pt"), val_shard(root / "val.bin", n_tokens=4097)


@pytest.mark.parametrize("variant", [[], ["--budget", "120000"]], ids=["gptq", "budget"])
def test_two_processes_write_the_one_process_artifact(files, variant):
    root, ckpt, _ = files
    name = "budget" if variant else "gptq"
    outs = {n: root / f"{name}_{n}.gqa" for n in (1, 2)}
    summaries = {n: _json(_run(n, "quantize", str(ckpt), "-o", str(outs[n]), "--float-max-numel", "0", *CALIB,
                                *variant, "--json")) for n in (1, 2)}
    assert outs[2].read_bytes() == outs[1].read_bytes()
    assert summaries[2]["artifact_bytes"] == summaries[1]["artifact_bytes"]
    if variant:  # the calibration and measurement caches: written by rank 0 alone, beside the artifact
        assert sorted(p.name for p in root.glob(f"{name}_2.*")) == sorted(
            p.name.replace("_1.", "_2.") for p in root.glob(f"{name}_1.*"))
    assert not list(root.glob(".*.tmp"))


def test_two_processes_evaluate_like_one(files):
    root, ckpt, val = files
    art = root / "eval.gqa"
    _json(_run(1, "quantize", str(ckpt), "-o", str(art), "--method", "rtn", "--json"))
    args = ["roundtrip-eval", str(art), "--ckpt", str(ckpt), "--val", str(val), "--batch-seqs", "4", "--json"]
    one, two = _json(_run(1, *args)), _json(_run(2, *args))
    assert (one["processes"], two["processes"], two["device"]) == (1, 2, "cpu")
    assert two["tokens"] == one["tokens"] == 4096
    for model in ("float", "quantized"):
        assert two[model]["val_bpb"] == pytest.approx(one[model]["val_bpb"], abs=1e-9, rel=0)


def test_sweep_under_two_processes_writes_its_files_once(files):
    root, ckpt, val = files
    out = root / "sweep"
    result = _json(_run(2, "sweep", str(ckpt), "--methods", "rtn", "--budgets", "120000", "--val", str(val),
                        "--float-max-numel", "0",
                        "--max-tokens", "2048", "-o", str(out), *CALIB, "--json"))
    (point,) = result["points"]
    assert point["error"] is None and point["total_bytes"] <= 120000
    assert json.loads((out / "sweep.json").read_text())["points"][0]["artifact_bytes"] == point["artifact_bytes"]
    assert (out / "sweep.png").exists() and len(list((out / "artifacts").iterdir())) == 1


def test_an_error_on_every_rank_is_reported_once_and_writes_nothing(files):
    root, ckpt, _ = files
    folder = root / "a_folder.gqa"
    folder.mkdir()
    done = _run(2, "quantize", str(ckpt), "-o", str(folder), "--method", "rtn", "--json")
    assert done.returncode != 0 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {folder}: is a folder; give the path of a file to write"], done.stderr[-3000:]
    assert list(folder.iterdir()) == []


def test_commands_that_run_in_one_process_refuse_torchrun(files):
    done = _run(2, "size-report", str(files[1]))
    assert done.returncode != 0
    errors = {line for line in done.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and "size-report runs in one process" in errors.pop()


COLLECTIVE = textwrap.dedent("""
    import sys
    from golfquant import distributed
    from golfquant.errors import DataError

    env = distributed.init_from_env()
    def work():
        if env.rank == 1:
            raise DataError("shard 7 is damaged")
        return env.rank
    try:
        distributed.collective(work)
    except DataError as e:
        print(f"rank {env.rank}: {e}")
    print(distributed.on_main(lambda: f"written by {env.rank}"), distributed.my_items(list(range(5)), [1, 5, 2, 4, 3]))
    distributed.shutdown()
""")


def test_a_failing_rank_gives_every_rank_its_error(tmp_path):
    script = tmp_path / "collective.py"
    script.write_text(COLLECTIVE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--tee", "3", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = sorted(line.split("]:", 1)[-1] for line in done.stdout.splitlines() if line.strip())
    # both ranks raised rank 1's error; rank 0 alone ran the on_main function; largest-first round robin
    assert out == ["rank 0: shard 7 is damaged", "rank 1: shard 7 is damaged",
                   "written by 0 [1, 4, 0]", "written by 0 [3, 2]"], done.stdout
