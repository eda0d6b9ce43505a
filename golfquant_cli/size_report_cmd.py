"""`golfquant size-report`: where every byte goes, against the cap, code included."""
from __future__ import annotations

from pathlib import Path

import click

from golfquant.codepack import code_size
from golfquant.plot import size_report_png
from golfquant.report import CAP_BYTES, size_report as build_report
from golfquant_cli import render
from golfquant_cli.options import json_option, parse_budget


@click.command("size-report")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--code", "code_path", type=click.Path(path_type=Path), default=None,
              help="Your train_gpt.py (or the packed form): its bytes count toward the cap.")
@click.option("--packed-code", is_flag=True, help="Count the code as its packed self-extracting form (pack-code).")
@click.option("--budget", default=str(CAP_BYTES), show_default=True, help="Decimal bytes, e.g. 16000000 or 16e6.")
@click.option("--no-entropy", is_flag=True, help="Skip the entropy bounds (they decode every section).")
@click.option("--compare-codecs", is_flag=True,
              help="Also compress every codes section with every codec x layout and print the sizes (slow).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a PNG of the bytes by role group and by layer, beside the entropy bound.")
@json_option
def size_report(artifact, code_path, packed_code, budget, no_entropy, compare_codecs, plot_path, as_json):
    """Bytes per tensor and per role group, scales and metadata, code bytes, total and headroom."""
    code_bytes = 0 if code_path is None else code_size(code_path, packed=packed_code)
    report = build_report(artifact, code_bytes, parse_budget(budget), entropy=not no_entropy,
                          compare_codecs=compare_codecs)
    if plot_path is not None:
        size_report_png(report, plot_path)
    if as_json:
        render.emit_json(render.size_report_json(report, plot_path))
    else:
        render.print_size_report(report)
