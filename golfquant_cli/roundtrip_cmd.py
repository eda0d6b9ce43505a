"""`golfquant roundtrip-eval`: val_bpb before and after quantization, as the challenge computes it."""
from __future__ import annotations

from pathlib import Path

import click

from golfquant.data import default_tokenizer_path, default_val_pattern
from golfquant.factory import parse_model_args
from golfquant.roundtrip import RoundtripOptions, roundtrip_eval
from golfquant_cli import render
from golfquant_cli.defaults import resolve_checkpoint
from golfquant_cli.options import device_option, json_option, model_options, torchrun_command


@click.command("roundtrip-eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="The float checkpoint [default: the bundled one].")
@click.option("--val", "val_pattern", default=None, metavar="GLOB",
              help="Validation shards [default: the bundled fineweb_val_*.bin].")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="SentencePiece model for the byte counts [default: the bundled one].")
@click.option("--max-tokens", type=int, default=None,
              help="Evaluate on the first N+1 validation tokens [default: all].")
@click.option("--seq-len", type=int, default=None, help="Evaluation sequence length [default: the model's].")
@click.option("--stride", type=int, default=None, help="Sliding-window stride (the corrected challenge variant).")
@click.option("--batch-seqs", type=int, default=16, show_default=True)
@click.option("--packed", is_flag=True,
              help="Keep quantized Linear weights packed and dequantize inside the matmul (Triton on CUDA).")
@model_options
@device_option
@json_option
@torchrun_command
def roundtrip_eval_cmd(artifact, ckpt, val_pattern, tokenizer, max_tokens, seq_len, stride, batch_seqs, packed, heads,
                       model_spec, model_args, device, as_json):
    """val_loss and val_bpb of the float checkpoint and of ARTIFACT's dequantized weights."""
    ckpt = resolve_checkpoint(ckpt, quiet=as_json)
    opts = RoundtripOptions(
        val_pattern=val_pattern or default_val_pattern(), tokenizer=str(tokenizer or default_tokenizer_path()),
        max_tokens=max_tokens, seq_len=seq_len, stride=stride, batch_seqs=batch_seqs, packed=packed, num_heads=heads,
        model_spec=model_spec, model_args=parse_model_args(list(model_args)) if model_args else None,
        device=device)
    with render.stage_progress(enabled=not as_json) as progress:
        result = render.roundtrip_json(roundtrip_eval(artifact, ckpt, opts, progress))
    if as_json:
        render.emit_json(result)
    else:
        render.print_roundtrip(result)
