"""`golfquant sweep`: val_bpb against total bytes for several methods and budgets, as a table, JSON and a PNG."""
from __future__ import annotations

import time
from pathlib import Path

import click

from golfquant import distributed
from golfquant.data import default_tokenizer_path, default_val_pattern
from golfquant.errors import OptionError
from golfquant.plot import sweep_png
from golfquant.sweep import DEFAULT_FRACTIONS, DEFAULT_MAX_TOKENS, SWEEP_METHODS, SweepOptions, sweep as run_sweep
from golfquant_cli import render
from golfquant_cli.defaults import resolve_checkpoint
from golfquant_cli.options import calib_options, device_option, json_option, parse_budget, torchrun_command

_FRACTIONS = ", ".join(f"{100 * f:.0f}%" for f in DEFAULT_FRACTIONS)


def _budgets(text: str | None) -> tuple[int, ...]:
    return () if text is None else tuple(parse_budget(b) for b in text.split(",") if b.strip())


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    if len(set(methods)) != len(methods):
        raise OptionError(f"--methods {text!r} names a method twice")
    return methods


@click.command()
@click.argument("ckpt", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--budgets", default=None, metavar="B1,B2,...",
              help="Total bytes (artifact + code), decimal, e.g. 12e6,14e6,16e6 "
                   f"[default: {_FRACTIONS} of the model's int8 bytes].")
@click.option("--methods", default=",".join(SWEEP_METHODS), show_default=True,
              help="Comma-separated, from " + ", ".join(SWEEP_METHODS) + ".")
@click.option("--code", "code_path", type=click.Path(path_type=Path), default=None,
              help="Your train_gpt.py: its bytes count toward every budget.")
@click.option("--packed-code", is_flag=True, help="Count the code as its packed self-extracting form (pack-code).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("out/sweep"),
              show_default=True, help="Folder for sweep.json, sweep.png and the artifacts.")
@click.option("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, show_default=True,
              help="Evaluate on the first N+1 validation tokens (0 = all).")
@click.option("--val", "val_pattern", default=None, metavar="GLOB",
              help="Validation shards [default: the bundled fineweb_val_*.bin].")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="SentencePiece model for the byte counts [default: the bundled one].")
@click.option("--float-max-numel", default=65536, show_default=True,
              help="Float tensors this small stay fp16 (the challenge's convention).")
@calib_options
@device_option
@json_option
@torchrun_command
def sweep(ckpt, budgets, methods, code_path, packed_code, out_dir, max_tokens, val_pattern, tokenizer,
          float_max_numel, calib, device, as_json):
    """Quantize CKPT (default: the bundled checkpoint) with every method at every budget, and plot val_bpb
    against total bytes."""
    ckpt = resolve_checkpoint(ckpt, quiet=as_json)
    opts = SweepOptions(
        val_pattern=val_pattern or default_val_pattern(), tokenizer=str(tokenizer or default_tokenizer_path()),
        budgets=_budgets(budgets), methods=_methods(methods), out_dir=out_dir, code_path=code_path,
        packed_code=packed_code, max_tokens=max_tokens or None, float_max_numel=float_max_numel,
        calib=calib,
        device=device)
    opts.validate()
    start = time.perf_counter()
    with render.stage_progress(enabled=not as_json) as progress:
        result = run_sweep(ckpt, opts, progress, on_point=None if as_json else _print_point)
    png = distributed.on_main(lambda: sweep_png(result.to_dict()["points"], out_dir / "sweep.png", result.float_bpb,
                                                result.cap))
    if as_json:
        render.emit_json(result.to_dict() | {"png": str(png)})
        return
    if not opts.budgets:
        render.status_console.print(f"budgets: {_FRACTIONS} of the int8 bytes ({result.int8_bytes:,})")
    _print_table(result)
    render.console.print(f"wrote {out_dir / 'sweep.json'} and {png} in {time.perf_counter() - start:.0f} s")


def _print_point(p) -> None:
    done = f"val_bpb {p.val_bpb:.4f}" if p.error is None else f"[red]{p.error}[/red]"
    size = "" if p.total_bytes is None else f"{p.total_bytes:,} bytes"
    render.status_console.print(f"  {p.method:<10} {p.budget:>12,}  {size:>17}  {done}")


def _print_table(result) -> None:
    rows = []
    for p in result.points:
        if p.error is not None:
            rows.append((p.method, render.fmt_bytes(p.budget), "", "", "", "", "", p.error))
            continue
        rows.append((p.method, render.fmt_bytes(p.budget), render.fmt_bytes(p.artifact_bytes),
                     render.fmt_bytes(p.total_bytes), render.fmt_bpb(p.val_bpb), f"{p.gap_bpb:+.4f}",
                     p.bits or "", f"pruned {p.pruned_codes:,}" if p.pruned_codes else ""))
    title = (f"sweep of {result.checkpoint}: float val_bpb {result.float_bpb:.4f} on {result.eval_tokens:,} tokens, "
             f"code {result.code_bytes:,} bytes")
    right = ["budget", "artifact bytes", "total bytes", "val_bpb", "gap"]
    render.console.print(render.table(title, ["method", "budget", "artifact bytes", "total bytes", "val_bpb", "gap",
                                              "widths", "note"], rows, right=right))
