"""`golfquant pack-code`: a training script -> the self-extracting one-line wrapper the challenge counts."""
from __future__ import annotations

from pathlib import Path

import click

from golfquant.atomic import atomic_write_text
from golfquant.codepack import CODECS, check_packed, pack, read_source
from golfquant_cli.options import json_option
from golfquant_cli.render import console, emit_json, fmt_bytes, table


@click.command("pack-code")
@click.argument("script", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the packed script.")
@click.option("--codec", type=click.Choice(["best", *CODECS]), default="best", show_default=True,
              help="Decompressor of the wrapper; best tries all and keeps the shortest script.")
@click.option("--strip-annotations", is_flag=True,
              help="Also drop parameter and return annotations (as pyminify does; ~4% smaller). Changes behaviour only "
                   "for code that reads them: torch.jit.script, functools.singledispatch, typing.get_type_hints.")
@click.option("--no-check", is_flag=True,
              help="Skip the import smoke test (it imports both scripts in subprocesses, so their imports must work).")
@json_option
def pack_code(script: Path, out: Path, codec: str, strip_annotations: bool, no_check: bool, as_json: bool) -> None:
    """Minify SCRIPT (no renaming) and wrap it as `exec(<codec>.decompress(b85decode(...)))`."""
    packed = pack(read_source(script), codec, name=str(script), strip_annotations=strip_annotations)
    if not no_check:
        check_packed(script, packed.text)  # before writing, so a failed check leaves no output file
    atomic_write_text(out, packed.text)
    summary = {"raw_bytes": packed.raw_bytes, "minified_bytes": packed.minified_bytes,
               "packed_bytes": packed.packed_bytes, "codec": packed.codec, "out": str(out), "checked": not no_check}
    if as_json:
        emit_json(summary)
        return
    rows = [(label, fmt_bytes(n), f"{n / packed.raw_bytes:.1%}")
            for label, n in (("raw", packed.raw_bytes), ("minified", packed.minified_bytes),
                             (f"packed ({packed.codec})", packed.packed_bytes))]
    console.print(table(f"code size of {script}", ["form", "bytes", "of raw"], rows, right=["bytes", "of raw"]))
    console.print(f"wrote {out}" + ("" if no_check else " (import smoke test passed)"))
