"""`golfquant demo`: quantize -> size-report -> roundtrip-eval on the bundled checkpoint."""
from __future__ import annotations

from pathlib import Path

import click

from golfquant.calib import CalibConfig
from golfquant.data import default_data_dir, default_tokenizer_path, default_val_pattern
from golfquant.api import quantize_checkpoint
from golfquant.pipeline import QuantizeOptions, RoundtripOptions, roundtrip_eval
from golfquant.plan import PlanOptions
from golfquant.report import size_report
from golfquant_cli import render
from golfquant_cli.options import json_option

DEMO_PLAN = PlanOptions(mlp="int4", attn="int6", embed="int8")


@click.command()
@click.option("-o", "--out-dir", type=click.Path(path_type=Path), default=Path("out/demo"), show_default=True)
@click.option("--calib-seqs", default=16, show_default=True, help="Self-generated calibration sequences.")
@json_option
def demo(out_dir, calib_seqs, as_json):
    """The main job on the bundled model: GPTQ int4 MLP / int6 attention / int8 embedding, then size and bpb."""
    ckpt = default_data_dir() / "model.pt"
    artifact = out_dir / "model.gqa"
    opts = QuantizeOptions(plan=DEMO_PLAN, method="gptq", clip="amax",
                           calib=CalibConfig(seqs=calib_seqs, batch=calib_seqs))
    say = (lambda text: None) if as_json else render.console.rule
    say(f"1/3 quantize {ckpt.name}: GPTQ on self-generated calibration, int4 MLP, int6 attention, int8 embedding")
    with render.stage_progress(enabled=not as_json) as progress:
        summary = quantize_checkpoint(ckpt, artifact, opts, progress=progress,
                                      on_tensor=None if as_json else render.print_tensor_report)
    say("2/3 size-report")
    report = size_report(artifact)
    say("3/3 roundtrip-eval: val_bpb of the float and the quantized model on the bundled validation shard")
    rt_opts = RoundtripOptions(val_pattern=default_val_pattern(), tokenizer=str(default_tokenizer_path()))
    with render.stage_progress(enabled=not as_json) as progress:
        roundtrip = roundtrip_eval(artifact, ckpt, rt_opts, progress)
    if as_json:
        render.emit_json({"quantize": summary, "size_report": report, "roundtrip": roundtrip})
        return
    render.print_size_report(report)
    render.print_roundtrip(roundtrip)
