"""`golfquant export-loader`: the self-contained loader a challenge script pastes in place of `import golfquant`."""
from __future__ import annotations

from pathlib import Path

import click

from golfquant.atomic import atomic_write_text
from golfquant.errors import OptionError
from golfquant.export import LOADER_CODECS, artifact_codecs, artifact_rotates, loader_source, packed_loader
from golfquant_cli.options import json_option
from golfquant_cli.render import console, emit_json, fmt_bytes, table


@click.command("export-loader")
@click.option("--artifact", type=click.Path(path_type=Path), default=None,
              help="Emit the smallest loader that reads this artifact (only the codecs it uses); default: all codecs.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the loader here (atomically) instead of printing it.")
@click.option("--packed", is_flag=True, help="Emit the self-extracting one-line form (exec of a decompressed blob).")
@click.option("--readable", is_flag=True, help="Emit the commented source instead of the minified one.")
@json_option
def export_loader(artifact: Path | None, out: Path | None, packed: bool, readable: bool, as_json: bool) -> None:
    """A `load_artifact(path)` function needing only numpy, torch and the stdlib (+ brotli / zstandard if the
    artifact uses them) that rebuilds golfquant.load_artifact's state_dict bit for bit. It does not validate:
    check a stranger's artifact with golfquant first."""
    if packed and readable:
        raise OptionError("--packed and --readable exclude each other: the packed form is built from the minified one")
    codecs = artifact_codecs(artifact) if artifact is not None else set(LOADER_CODECS)
    rotate = artifact is None or artifact_rotates(artifact)
    minimal = loader_source(True, codecs, rotate)
    wrapped = packed_loader(codecs, rotate)
    text = wrapped.text if packed else loader_source(False, codecs, rotate) if readable else minimal
    sizes = {"raw_bytes": len(loader_source(False, codecs, rotate).encode("utf-8")),
             "minified_bytes": len(minimal.encode("utf-8")), "packed_bytes": wrapped.packed_bytes}
    if out is not None:
        atomic_write_text(out, text)
    if as_json:
        summary = {"bytes": len(text.encode("utf-8")), "codecs": sorted(codecs),
                   "out": None if out is None else str(out), **sizes}
        emit_json(summary if out is not None else summary | {"source": text})
    elif out is None:
        click.echo(text, nl=not text.endswith("\n"))
    else:
        rows = [(label, fmt_bytes(sizes[f"{label}_bytes"])) for label in ("raw", "minified", "packed")]
        console.print(table("exported loader", ["form", "bytes"], rows, right=["bytes"]))
        console.print(f"wrote {out} ({fmt_bytes(len(text.encode('utf-8')))} bytes; decodes {', '.join(sorted(codecs))})")
