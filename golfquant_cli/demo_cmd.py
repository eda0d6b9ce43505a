"""`golfquant demo`: the records' recipe, then `--budget` at the same bytes, on the bundled checkpoint."""
from __future__ import annotations

from pathlib import Path

import click

from golfquant.api import quantize_checkpoint
from golfquant.calib import CalibConfig
from golfquant.data import default_data_dir, default_tokenizer_path, default_val_pattern
from golfquant.options import QuantizeOptions
from golfquant.plan import PlanOptions
from golfquant.report import size_report
from golfquant.roundtrip import RoundtripOptions, roundtrip_eval
from golfquant_cli import render
from golfquant_cli.options import json_option

# The SDClip records' recipe (brief §2.10): GPTQ int6 k=12.85 on the matrices, int8 k=20 on the tied embedding.
RECORDS_PLAN = PlanOptions(mlp="int6", attn="int6", embed="int8", other="int6")
RECORDS_CLIP = "sdclip:12.85,embed=20"


@click.command()
@click.option("-o", "--out-dir", type=click.Path(path_type=Path), default=Path("out/demo"), show_default=True)
@click.option("--calib-seqs", default=64, show_default=True, help="Self-generated calibration sequences.")
@click.option("--max-tokens", default=None, type=int, help="Validation tokens to evaluate [default: all].")
@json_option
def demo(out_dir, calib_seqs, max_tokens, as_json):
    """The main job on the bundled model: the records' recipe, then `quantize --budget` at the bytes it needs,
    and the val_bpb of both."""
    ckpt = default_data_dir() / "model.pt"
    calib = CalibConfig(seqs=calib_seqs)
    say = (lambda text: None) if as_json else render.console.rule
    say("1/4 the records' recipe: GPTQ int6 SDClip k=12.85 on the matrices, int8 k=20 on the tied embedding")
    with render.stage_progress(enabled=not as_json) as progress:
        records = quantize_checkpoint(ckpt, QuantizeOptions(plan=RECORDS_PLAN, clip=RECORDS_CLIP, calib=calib),
                                      progress=progress)
    records.save(out_dir / "records.gqa")
    budget = records.total_bytes
    say(f"2/4 quantize --budget {budget:,}: every matrix's storage chosen by measured damage, at the same bytes")
    with render.stage_progress(enabled=not as_json) as progress:
        result = quantize_checkpoint(ckpt, QuantizeOptions(calib=calib, budget=budget), progress=progress,
                                     cache=out_dir / "model")
    result.save(out_dir / "model.gqa")
    summary = render.quantize_json(result, out_dir / "model.gqa")
    if not as_json:
        render.print_quantize_summary(summary)
    say("3/4 size-report")
    report = size_report(out_dir / "model.gqa", budget=budget)
    if not as_json:
        render.print_size_report(report)
    say("4/4 roundtrip-eval of both artifacts on the bundled validation shard")
    rt_opts = RoundtripOptions(val_pattern=default_val_pattern(), tokenizer=str(default_tokenizer_path()),
                               max_tokens=max_tokens)
    roundtrips = {}
    for name in ("records", "model"):
        with render.stage_progress(enabled=not as_json) as progress:
            roundtrips[name] = render.roundtrip_json(roundtrip_eval(out_dir / f"{name}.gqa", ckpt, rt_opts, progress))
    if as_json:
        render.emit_json({"records": render.quantize_json(records, out_dir / "records.gqa"), "quantize": summary,
                          "size_report": render.size_report_json(report), "roundtrip": roundtrips})
        return
    render.print_demo_comparison(records.total_bytes, result.total_bytes, roundtrips["records"], roundtrips["model"])
