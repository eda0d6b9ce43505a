"""Every command through click's CliRunner: JSON contracts, byte accounting, exit codes on bad input."""
from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import torch
from click.testing import CliRunner

from golfquant.data import load_tokens
from golfquant_cli.main import cli

from helpers import TOKENIZER, tiny_checkpoint, val_shard


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def invoke_json(*args) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return val_shard(tmp_path_factory.mktemp("val") / "fineweb_val_000000.bin", n_tokens=1200)


def test_quantize_and_size_report_account_for_every_byte(ckpt, tmp_path):
    out = tmp_path / "a.gqa"
    code = tmp_path / "train_gpt.py"
    code.write_text("print('hello')\n" * 10)
    q = invoke_json("quantize", ckpt, "-o", out, "--mlp", "int4", "--attn", "int6", "--float-max-numel", "0",
                    "--code", code)
    assert q["artifact_bytes"] == out.stat().st_size
    assert q["code_bytes"] == code.stat().st_size
    assert q["total_bytes"] == q["artifact_bytes"] + q["code_bytes"]
    schemes = {t["name"]: t["scheme"] for t in q["tensors"]}
    assert schemes["blocks.0.mlp.fc.weight"] == "int4"
    assert schemes["blocks.1.attn.c_k.weight"] == "int6"
    assert schemes["blocks.0.attn_scale"] == "fp32"

    r = invoke_json("size-report", out, "--code", code, "--budget", "16e6")
    assert r["artifact_bytes"] == out.stat().st_size
    assert r["total_bytes"] == r["artifact_bytes"] + r["code_bytes"]
    assert r["headroom_bytes"] == 16_000_000 - r["total_bytes"]
    assert sum(t["compressed_bytes"] for t in r["tensors"]) + r["header_bytes"] + r["manifest_bytes"] \
        == r["artifact_bytes"]
    fc = next(t for t in r["tensors"] if t["name"] == "blocks.0.mlp.fc.weight")
    assert fc["bits"] == 4 and fc["shape"] == [256, 128] and fc["compressed_bytes"] > 0 and fc["codec"]
    assert fc["entropy_bytes"] > 0 and "layout" in fc


REPORT_KEYS = {"artifact", "artifact_bytes", "code_bytes", "total_bytes", "budget", "headroom_bytes", "header_bytes",
               "manifest_bytes", "scales_bytes", "entropy_bytes", "row_entropy_bytes", "codes_bytes", "overhead_pct",
               "groups", "tensors"}
TENSOR_KEYS = {"name", "role", "shape", "scheme", "bits", "elements", "raw_bytes", "compressed_bytes", "codes_bytes",
               "scales_bytes", "lqer_bytes", "salient_bytes", "bits_per_weight", "codec", "layout"}
ENTROPY_KEYS = {"entropy_bytes", "row_entropy_bytes", "col_entropy_bytes", "overhead_pct", "row_overhead_pct"}
GROUP_KEYS = {"role", "tensors", "elements", "raw_bytes", "compressed_bytes", "codes_bytes", "entropy_bytes",
              "row_entropy_bytes", "bits_per_weight", "overhead_pct"}


def test_size_report_json_keys_with_and_without_the_optional_parts(ckpt, tmp_path):
    out = tmp_path / "a.gqa"
    invoke_json("quantize", ckpt, "-o", out, "--method", "rtn", "--mlp", "int4", "--float-max-numel", "0")
    full = invoke_json("size-report", out, "--compare-codecs")
    assert set(full) == REPORT_KEYS | {"compare_codecs"}
    assert all(set(g) == GROUP_KEYS for g in full["groups"])
    for t in full["tensors"]:  # the entropy bounds are of the codes: quantized tensors only
        assert set(t) == TENSOR_KEYS | (ENTROPY_KEYS if t["bits"] else set()), t["name"]
    quantized = [t["name"] for t in full["tensors"] if t["bits"]]
    assert quantized and [r["name"] for r in full["compare_codecs"]] == quantized
    for r in full["compare_codecs"]:
        assert set(r) == {"name", "bits", "sizes", "chosen", "estimates"}
        assert r["chosen"] in r["sizes"] and set(r["estimates"]) == set(r["sizes"])

    bare = invoke_json("size-report", out, "--no-entropy")
    assert set(bare) == REPORT_KEYS
    assert bare["entropy_bytes"] is None and bare["overhead_pct"] is None and bare["codes_bytes"] == 0
    assert bare["tensors"] == [{k: v for k, v in t.items() if k not in ENTROPY_KEYS} for t in full["tensors"]]


def test_roundtrip_eval_reports_both_models(ckpt, val, tmp_path):
    out = tmp_path / "a.gqa"
    invoke_json("quantize", ckpt, "-o", out, "--mlp", "int8", "--attn", "int8", "--embed", "int8")
    r = invoke_json("roundtrip-eval", out, "--ckpt", ckpt, "--val", val, "--tokenizer", TOKENIZER,
                    "--max-tokens", 512)
    assert set(r) >= {"float", "quantized", "gap_bpb", "tokens"}
    assert r["tokens"] == 512
    assert r["gap_bpb"] == pytest.approx(r["quantized"]["val_bpb"] - r["float"]["val_bpb"])
    assert abs(r["gap_bpb"]) < 0.05
    packed = invoke_json("roundtrip-eval", out, "--ckpt", ckpt, "--val", val, "--tokenizer", TOKENIZER,
                         "--max-tokens", 512, "--packed")
    assert packed["quantized"]["val_bpb"] == pytest.approx(r["quantized"]["val_bpb"], abs=1e-4)


def test_quantize_gptq_reports_each_matrix(ckpt, tmp_path):
    q = invoke_json("quantize", ckpt, "-o", tmp_path / "g.gqa", "--method", "gptq", "--mlp", "int4",
                    "--float-max-numel", "0", "--calib-seqs", 2, "--calib-len", 16, "--clip", "sdclip")
    reports = {r["name"]: r for r in q["reports"]}
    assert reports["blocks.0.mlp.fc.weight"]["method"] == "gptq"
    assert reports["blocks.0.mlp.fc.weight"]["error_vs_rtn"] < 1.0
    assert q["meta"]["calibration"]["tokens"] == 32


@pytest.mark.parametrize("args, message", [
    (["quantize", "missing.pt"], "no such file"),
    (["quantize", "{ckpt}", "--mlp", "int9"], "int9"),
    (["size-report", "{ckpt}", "--budget", "lots"], "budget"),
    (["quantize", "{ckpt}", "--clip", "sdclip:0"], "clip"),
    (["quantize", "{ckpt}", "--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
    pytest.param(["quantize", "{ckpt}", "--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_input_is_one_line_and_exit_2(ckpt, tmp_path, args, message):
    out = tmp_path / "never.gqa"
    args = [a.replace("{ckpt}", str(ckpt)) for a in args]
    if args[0] == "quantize":
        args += ["-o", str(out)]
    result = invoke(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not out.exists()


def test_data_build_writes_shards_and_tokenizer(tmp_path):
    text = tmp_path / "corpus.txt"
    docs = [" ".join(f"word{i % 97} and the {i % 13} others went home." for i in range(d, d + 400))
            for d in range(12)]
    text.write_text("\n\f\n".join(docs))
    out = tmp_path / "ds"
    r = invoke_json("data", "build", text, "--vocab", 300, "-o", out, "--val-fraction", 0.25)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert r["tokenizer_vocab"] == sp.get_piece_size() == 300
    assert (r["docs_val"], r["docs_train"]) == (3, 9)
    for split in ("val", "train"):
        tokens = load_tokens(str(out / f"fineweb_{split}_*.bin"))
        assert tokens.numel() == r[f"tokens_{split}"] > 0 and int(tokens.max()) < 300
    assert sorted(r["files"]) == sorted(str(f) for f in out.iterdir())


def test_sequential_gptq_quantizes_block_by_block(ckpt, tmp_path):
    q = invoke_json("quantize", ckpt, "-o", tmp_path / "s.gqa", "--method", "gptq", "--sequential", "--mlp", "int4",
                    "--float-max-numel", "0", "--calib-seqs", 2, "--calib-len", 16)
    assert q["meta"]["calibration"]["sequential"] is True
    assert {r["method"] for r in q["reports"]} == {"gptq"}
    assert invoke("quantize", ckpt, "--sequential", "--method", "rtn", "-o", tmp_path / "x.gqa").exit_code == 2


def test_int8_roundtrip_gap_on_the_bundled_model_is_below_a_hundredth(tmp_path):
    out = tmp_path / "int8.gqa"
    invoke_json("quantize", "-o", out, "--mlp", "int8", "--attn", "int8", "--embed", "int8", "--method", "rtn")
    r = invoke_json("roundtrip-eval", out, "--max-tokens", 8192)
    assert r["float"]["val_bpb"] > 1.0 and abs(r["gap_bpb"]) < 0.01
