"""Terminal rendering shared by the commands: rich tables and progress bars, or one JSON object."""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Callable, Iterator, Sequence

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from golfquant.report import CAP_BYTES

# Piped output has no terminal width; use one wide enough for the per-tensor tables.
console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 150)
status_console = Console(stderr=True, highlight=False)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=None, sort_keys=False))


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[str] = ()) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def fmt_bytes(n: int) -> str:
    return f"{n:,}"


def fmt_bpb(x: float) -> str:
    return f"{x:.4f}"


@contextlib.contextmanager
def stage_progress(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """Yield `update(stage, done, total)`: one bar per stage (tokens/s shown), drawn on stderr."""
    if not enabled:
        yield lambda *a: None
        return
    columns = [
        TextColumn("[bold]{task.description:<20}"),
        BarColumn(),
        TextColumn("{task.completed:>10,.0f}/{task.total:,.0f}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=status_console) as prog:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total, rate="")
            task = prog.tasks[tasks[stage]]
            elapsed = task.elapsed or 0.0
            rate = f"{done / elapsed:,.0f}/s" if elapsed > 0 and done else ""
            prog.update(tasks[stage], completed=done, total=total, rate=rate)

        yield update


def print_tensor_report(r) -> None:
    extra = ""
    if r.damp is not None:
        extra = f"  damp {r.damp:.3g}  H-err/RTN {r.error_vs_rtn:.3f}"
    status_console.print(f"  {r.name:<40} {r.scheme:>5} {r.method:>4} {r.seconds:6.2f}s{extra}")


def print_quantize_summary(summary: dict) -> None:
    total = summary["total_bytes"]
    rows = [
        ("artifact", summary["artifact"]),
        ("artifact bytes", fmt_bytes(summary["artifact_bytes"])),
        ("code bytes", fmt_bytes(summary["code_bytes"])),
        ("total bytes", fmt_bytes(total)),
        ("headroom vs 16,000,000", fmt_bytes(CAP_BYTES - total)),
    ]
    console.print(table("quantize", ["", "value"], rows, right=["value"]))


def print_roundtrip(r: dict) -> None:
    rows = [
        ("float", f"{r['float']['val_loss']:.4f}", fmt_bpb(r["float"]["val_bpb"])),
        ("quantized", f"{r['quantized']['val_loss']:.4f}", fmt_bpb(r["quantized"]["val_bpb"])),
        ("gap", "", f"{r['gap_bpb']:+.4f}"),
    ]
    window = f"stride {r['stride']}" if r["stride"] else "non-overlapping"
    title = f"roundtrip on {r['tokens']:,} tokens ({r['bytes']:,} bytes), seq_len {r['seq_len']}, {window}"
    console.print(table(title, ["model", "val_loss", "val_bpb"], rows, right=["val_loss", "val_bpb"]))


def print_size_report(r: dict) -> None:
    rows = []
    for t in r["tensors"]:
        entropy = f"{t['entropy_bytes']:,.0f}" if t.get("entropy_bytes") is not None else ""
        over = f"{t['overhead_pct']:+.1f}%" if t.get("overhead_pct") is not None else ""
        rows.append((t["name"], "×".join(map(str, t["shape"])), t["scheme"], fmt_bytes(t["elements"]),
                     fmt_bytes(t["raw_bytes"]), fmt_bytes(t["compressed_bytes"]), f"{t['bits_per_weight']:.2f}",
                     entropy, over, t["codec"], t["layout"] or ""))
    console.print(table("tensors", ["tensor", "shape", "scheme", "elements", "raw B", "compressed B", "bits/w",
                                    "entropy B", "vs entropy", "codec", "layout"], rows,
                        right=["elements", "raw B", "compressed B", "bits/w", "entropy B", "vs entropy"]))
    groups = [(g["role"], g["tensors"], fmt_bytes(g["elements"]), fmt_bytes(g["raw_bytes"]),
               fmt_bytes(g["compressed_bytes"]), f"{g['bits_per_weight']:.2f}", f"{g['entropy_bytes']:,.0f}")
              for g in r["groups"]]
    console.print(table("role groups", ["role", "tensors", "elements", "raw B", "compressed B", "bits/w",
                                        "entropy B"], groups,
                        right=["tensors", "elements", "raw B", "compressed B", "bits/w", "entropy B"]))
    headroom = r["headroom_bytes"]
    style = "green" if headroom >= 0 else "bold red"
    totals = [
        ("header + manifest", fmt_bytes(r["header_bytes"] + r["manifest_bytes"])),
        ("fp16 scales (in the tensors above)", fmt_bytes(r["scales_bytes"])),
        ("artifact", fmt_bytes(r["artifact_bytes"])),
        ("code", fmt_bytes(r["code_bytes"])),
        ("total", fmt_bytes(r["total_bytes"])),
        ("budget", fmt_bytes(r["budget"])),
        ("headroom", f"[{style}]{headroom:,}[/{style}]"),
    ]
    console.print(table(f"submission size: {r['artifact']}", ["", "bytes"], totals, right=["bytes"]))
