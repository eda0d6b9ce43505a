"""`golfquant quantize`: checkpoint -> artifact."""
from __future__ import annotations

from pathlib import Path

import click

from golfquant import distributed
from golfquant.api import quantize_checkpoint
from golfquant.codepack import code_size
from golfquant.factory import parse_model_args
from golfquant.options import QuantizeOptions
from golfquant_cli import render
from golfquant_cli.defaults import resolve_checkpoint
from golfquant_cli.options import (calib_options, device_option, explicit_flags, json_option, model_options,
                                   parse_budget, parse_lqer, parse_salient, plan_from_flags, plan_options,
                                   rotate_option, torchrun_command)


@click.command()
@click.argument("ckpt", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Artifact path [default: out/<checkpoint name>.gqa].")
@plan_options
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="gptq: Cholesky GPTQ on self-generated calibration tokens; rtn: round to nearest (fast).")
@click.option("--clip", default="amax", show_default=True,
              help="amax | pct:P | mse | sdclip:K (or sdclip:mlp=K,attn=K,embed=K,default=K) | hsdclip:K,lambda=L | size[:BPW]")
@calib_options
@click.option("--block-size", default=128, show_default=True, help="GPTQ block size.")
@click.option("--act-order/--no-act-order", default=True, show_default=True, help="GPTQ column order by diag(H).")
@click.option("--damp", default=0.01, show_default=True, help="GPTQ damping, a fraction of mean(diag H).")
@click.option("--sequential", is_flag=True,
              help="GPTQ block by block: each block's Hessians collected with the earlier blocks already quantized.")
@click.option("--lqer", default=None, metavar="top=K,rank=R", help="Low-rank error correction of the K worst tensors.")
@click.option("--salient", default=None, metavar="top=K,group=G,bits=B|auto",
              help="Keep the K most salient groups of G input columns (activation RMS x mean |W|) of every matrix "
                   "with a Hessian at intB, in the same GPTQ solve (e.g. top=1,group=64,bits=8); auto (with "
                   "--budget): offer them per tensor to the allocation.")
@rotate_option
@model_options
@click.option("--code", "code_path", type=click.Path(path_type=Path), default=None,
              help="Your train_gpt.py: its bytes count toward the cap.")
@click.option("--packed-code", is_flag=True, help="Count the code as its packed self-extracting form (pack-code).")
@click.option("--budget", default=None, metavar="BYTES",
              help="Fit artifact + code into BYTES (decimal, e.g. 16000000 or 16e6): every matrix's storage (fp16, "
                   "width, clip, LQER) is chosen by measured damage; --mlp/--attn/--embed/--other/--clip/--rule/"
                   "--float-max-numel given explicitly stay fixed.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="With --budget: keep the calibration and the measurement next to the output and reuse them.")
@click.option("--prune-to-budget", is_flag=True,
              help="With --budget: keep the widths of the plan and zero the cheapest +-1 codes until it fits.")
@click.option("--exhaustive", is_flag=True, help="Compress every section with every codec x layout (slow).")
@device_option
@json_option
@torchrun_command
def quantize(ckpt, out, mlp, attn, embed, other, rules, float_max_numel, method, clip, calib, block_size, act_order,
             damp, sequential, lqer, salient, rotate, heads, model_spec, model_args, code_path, packed_code, budget,
             cache, prune_to_budget, exhaustive, device, as_json):
    """Quantize CKPT (default: the bundled checkpoint) into one artifact file."""
    given = explicit_flags(click.get_current_context(), ("mlp", "attn", "embed", "other", "clip", "float_max_numel"))
    ckpt = resolve_checkpoint(ckpt, quiet=as_json)
    out = out or Path("out") / f"{ckpt.stem}.gqa"
    opts = QuantizeOptions(
        plan=plan_from_flags(mlp, attn, embed, other, rules, float_max_numel), method=method, clip=clip,
        calib=calib,
        block_size=block_size, act_order=act_order, damp=damp, lqer=parse_lqer(lqer),
        salient=parse_salient(salient), num_heads=heads,
        model_spec=model_spec, model_args=parse_model_args(list(model_args)) if model_args else None,
        budget=None if budget is None else parse_budget(budget), prune_to_budget=prune_to_budget,
        fixed_roles=tuple(r for r in ("mlp", "attn", "embed", "other") if r in given), fixed_clip="clip" in given,
        fixed_float="float_max_numel" in given, exhaustive=exhaustive, sequential=sequential, device=device,
        rotate=rotate)
    code_bytes = 0 if code_path is None else code_size(code_path, packed=packed_code)
    note = None
    if opts.budget is not None and code_path is None:
        note = "no --code given: the budget counts the code as 0 bytes"
        if not as_json:
            render.status_console.print(f"note: {note}")
    with render.stage_progress(enabled=not as_json) as progress:
        result = quantize_checkpoint(ckpt, opts, code_bytes=code_bytes, progress=progress,
                                     on_tensor=None if as_json else render.print_tensor_report,
                                     cache=out.with_suffix("") if cache and opts.budget is not None else None)
    distributed.on_main(lambda: result.save(out))
    summary = render.quantize_json(result, out) | ({"note": note} if note else {})
    if as_json:
        render.emit_json(summary)
    else:
        render.print_quantize_summary(summary)
