"""The bundled defaults: used when a path is not given, and said so."""
from __future__ import annotations

from pathlib import Path

from golfquant.data import default_data_dir
from golfquant_cli import render


def resolve_checkpoint(path: Path | None, quiet: bool) -> Path:
    if path is not None:
        return path
    bundled = default_data_dir() / "model.pt"
    if not quiet:
        render.status_console.print(f"[dim]no checkpoint given: using the bundled {bundled}[/dim]")
    return bundled
