"""Terminal rendering shared by the commands: rich tables and progress bars, or one JSON object."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from typing import Any, Callable, Iterator, Sequence

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from golfquant.report import CAP_BYTES, CodecComparison, SizeReport

# Piped output has no terminal width; use one wide enough for the per-tensor tables.
console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 150)
status_console = Console(stderr=True, highlight=False)


def mute() -> None:
    """Print nothing from now on: under torchrun only rank 0 speaks."""
    global _muted
    _muted = console.quiet = status_console.quiet = True


_muted = False


def emit_json(obj: Any) -> None:
    if not _muted:
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
def stage_progress(enabled: bool) -> Iterator[Callable[..., None]]:
    """Yield `update(stage, done, total, info="")`: one bar per stage (the rate per second and `info` shown),
    drawn on stderr."""
    if not enabled:
        yield lambda *a, **k: None
        return
    columns = [
        TextColumn("[bold]{task.description:<20}"),
        BarColumn(),
        TextColumn("{task.completed:>10,.0f}/{task.total:,.0f}"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    ]
    # Only on a terminal: piped stderr must carry nothing but an error line.
    with Progress(*columns, console=status_console, disable=not status_console.is_terminal) as prog:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int, info: str = "") -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total, rate="", info="")
            task = prog.tasks[tasks[stage]]
            elapsed = task.elapsed or 0.0
            rate = f"{done / elapsed:,.0f}/s" if elapsed > 0 and done else ""
            prog.update(tasks[stage], completed=done, total=total, rate=rate, info=info)

        yield update


def print_tensor_report(r) -> None:
    extra = ""
    if r.damp is not None:
        extra = f"  damp {r.damp:.3g}  H-err/RTN {r.error_vs_rtn:.3f}"
    status_console.print(f"  {r.name:<40} {r.scheme:>5} {r.method:>4} {r.seconds:6.2f}s{extra}")


def quantize_json(result, out_path) -> dict:
    """The `quantize --json` object of a golfquant.api.QuantizeResult written to out_path."""
    summary = {
        "artifact": str(out_path),
        "artifact_bytes": len(result.data),
        "code_bytes": result.code_bytes,
        "total_bytes": result.total_bytes,
        "tensors": [{"name": tp.name, "role": tp.role, "scheme": tp.scheme, "bits": tp.bits}
                    for tp in result.plan.values()],
        "reports": [dataclasses.asdict(r) for r in result.reports],
        "meta": result.meta,
    }
    b = result.budget
    if b is not None:
        summary |= {"budget": b.budget, "budget_used": result.total_bytes / b.budget, "pruned_codes": b.pruned_codes,
                    "chosen_plan": b.chosen, "encodes": b.encodes, "seconds": b.seconds,
                    "measurement": None if b.measurement is None else dataclasses.asdict(b.measurement),
                    "plans": [dataclasses.asdict(p) for p in b.plans],
                    "allocation": [dataclasses.asdict(a) for a in b.allocation]}
    return summary


def print_quantize_summary(summary: dict) -> None:
    total = summary["total_bytes"]
    rows = [
        ("artifact", summary["artifact"]),
        ("artifact bytes", fmt_bytes(summary["artifact_bytes"])),
        ("code bytes", fmt_bytes(summary["code_bytes"])),
        ("total bytes", fmt_bytes(total)),
    ]
    budget = summary.get("budget") or CAP_BYTES
    rows.append((f"headroom vs {budget:,}", fmt_bytes(budget - total)))
    if summary.get("budget"):
        rows.append(("budget used", f"{100 * summary['budget_used']:.2f}%"))
        rows.append(("pruned ±1 codes", fmt_bytes(summary["pruned_codes"])))
    if summary.get("allocation"):
        alloc = [(a["name"], a["scheme"], a["setting"], "chosen" if a["free"] else "fixed by flags")
                 for a in summary["allocation"]]
        console.print(table(f"storage of every matrix (plan: {summary['chosen_plan']})",
                            ["tensor", "scheme", "setting", "how"], alloc))
    if summary.get("plans"):
        m = summary["measurement"]
        how = "cached" if m.get("cached") else f"{m.get('seconds', 0):.1f} s"
        plans = [(p["plan"] + (" *" if p["chosen"] else ""), _opt(p["total_bytes"], ","),
                  _opt(p["predicted_kl"], ".5f"), _opt(p["measured_kl"], ".5f")) for p in summary["plans"]]
        console.print(table(f"plans at the budget (measurement of {m.get('candidates', 0):,} candidates: {how}; "
                            f"KL in nats/token on {m.get('heldout_tokens', 0):,} held-out tokens; * = chosen)",
                            ["plan", "total bytes", "predicted KL", "measured KL"], plans,
                            right=["total bytes", "predicted KL", "measured KL"]))
        console.print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()))
    console.print(table("quantize", ["", "value"], rows, right=["value"]))


def roundtrip_json(r) -> dict:
    """The `roundtrip-eval --json` object of a golfquant.roundtrip.RoundtripResult."""
    return {"float": {"val_loss": r.float_model.val_loss, "val_bpb": r.float_model.val_bpb},
            "quantized": {"val_loss": r.quantized.val_loss, "val_bpb": r.quantized.val_bpb},
            "gap_bpb": r.gap_bpb, "tokens": r.float_model.tokens, "bytes": r.float_model.bytes,
            "seq_len": r.seq_len, "stride": r.stride, "packed": r.packed, "device": r.device,
            "processes": r.processes}


def print_roundtrip(r: dict) -> None:
    rows = [
        ("float", f"{r['float']['val_loss']:.4f}", fmt_bpb(r["float"]["val_bpb"])),
        ("quantized", f"{r['quantized']['val_loss']:.4f}", fmt_bpb(r["quantized"]["val_bpb"])),
        ("gap", "", f"{r['gap_bpb']:+.4f}"),
    ]
    window = f"sliding window, stride {r['stride']}" if r["stride"] else "non-overlapping windows"
    console.print(table("roundtrip-eval", ["model", "val_loss", "val_bpb"], rows, right=["val_loss", "val_bpb"]))
    console.print(f"on {r['tokens']:,} validation tokens ({r['bytes']:,} bytes), seq_len {r['seq_len']}, {window}")


def _opt(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def size_report_json(report: SizeReport, plot_path=None) -> dict:
    """The `size-report --json` object of a golfquant.report.SizeReport (and the chart written, if any): a tensor
    without entropy bounds lacks the entropy keys, and compare_codecs is there only when it was asked for."""
    obj = dataclasses.asdict(report)
    obj["artifact"] = str(report.artifact)
    for row in obj["tensors"]:
        row |= row.pop("entropy") or {}
    if report.compare_codecs is None:
        del obj["compare_codecs"]
    if plot_path is not None:
        obj["plot"] = str(plot_path)
    return obj


def print_size_report(r: SizeReport) -> None:
    rows = []
    for t in r.tensors:
        e = t.entropy
        bounds = ("",) * 4 if e is None else (f"{e.entropy_bytes:,.0f}", _opt(e.overhead_pct, "+.1f"),
                                              f"{e.row_entropy_bytes:,.0f}", _opt(e.row_overhead_pct, "+.1f"))
        rows.append((t.name, "×".join(map(str, t.shape)), t.scheme, fmt_bytes(t.elements),
                     fmt_bytes(t.compressed_bytes), f"{t.bits_per_weight:.2f}", fmt_bytes(t.codes_bytes), *bounds,
                     t.codec, t.layout or ""))
    right = ["elements", "compressed B", "bits/w", "codes B", "H0 B", "vs H0 %", "row-H B", "vs row-H %"]
    console.print(table("tensors (H0: order-0 entropy of the codes; row-H: per-row conditional entropy)",
                        ["tensor", "shape", "scheme", "elements", "compressed B", "bits/w", "codes B", "H0 B",
                         "vs H0 %", "row-H B", "vs row-H %", "codec", "layout"], rows, right=right))
    groups = [(g.role, g.tensors, fmt_bytes(g.elements), fmt_bytes(g.compressed_bytes), f"{g.bits_per_weight:.2f}",
               fmt_bytes(g.codes_bytes), f"{g.entropy_bytes:,.0f}", _opt(g.overhead_pct, "+.1f"),
               f"{g.row_entropy_bytes:,.0f}") for g in r.groups]
    console.print(table("role groups", ["role", "tensors", "elements", "compressed B", "bits/w", "codes B", "H0 B",
                                        "vs H0 %", "row-H B"], groups,
                        right=["tensors", "elements", "compressed B", "bits/w", "codes B", "H0 B", "vs H0 %",
                               "row-H B"]))
    if r.compare_codecs:
        print_compare_codecs(r.compare_codecs)
    headroom = r.headroom_bytes
    style = "green" if headroom >= 0 else "bold red"
    totals = [
        ("header + manifest", fmt_bytes(r.header_bytes + r.manifest_bytes)),
        ("fp16 scales (in the tensors above)", fmt_bytes(r.scales_bytes)),
        ("artifact", fmt_bytes(r.artifact_bytes)),
        ("code", fmt_bytes(r.code_bytes)),
        ("total", fmt_bytes(r.total_bytes)),
        ("budget", fmt_bytes(r.budget)),
        ("headroom", f"[{style}]{headroom:,}[/{style}]"),
    ]
    if r.entropy_bytes:
        totals.insert(2, ("codes vs order-0 entropy", f"{fmt_bytes(r.codes_bytes)} vs {r.entropy_bytes:,.0f} "
                                                      f"({r.overhead_pct:+.2f}%)"))
    console.print(table(f"submission size: {r.artifact}", ["", "bytes"], totals, right=["bytes"]))


def print_compare_codecs(rows: list[CodecComparison]) -> None:
    """One line per codes section and layout, one column per codec; * = written, bold = the section's smallest."""
    codecs = list(dict.fromkeys(k.partition("/")[0] for r in rows for k in r.sizes))
    body = []
    for r in rows:
        best = min(r.sizes.values())
        layouts = list(dict.fromkeys(k.partition("/")[2] for k in r.sizes))
        for i, layout in enumerate(layouts):
            cells = []
            for codec in codecs:
                key = f"{codec}/{layout}" if layout else codec
                size = r.sizes.get(key)
                text = "" if size is None else f"{size:,}" + ("*" if key == r.chosen else "")
                cells.append(f"[bold]{text}[/bold]" if size == best else text)
            body.append((r.name if i == 0 else "", f"int{r.bits}" if i == 0 else "", layout or "(codes)", *cells))
    console.print(table("codes sections: bytes per codec and layout (* = written, bold = smallest)",
                        ["tensor", "bits", "layout", *codecs], body, right=codecs))


def print_demo_comparison(records_bytes: int, budget_bytes: int, records: dict, budget: dict) -> None:
    rows = [("float", "", fmt_bpb(records["float"]["val_bpb"]), ""),
            ("records' recipe", fmt_bytes(records_bytes), fmt_bpb(records["quantized"]["val_bpb"]),
             f"{records['gap_bpb']:+.4f}"),
            ("--budget", fmt_bytes(budget_bytes), fmt_bpb(budget["quantized"]["val_bpb"]), f"{budget['gap_bpb']:+.4f}")]
    console.print(table(f"val_bpb on {budget['tokens']:,} validation tokens", ["model", "total bytes", "val_bpb", "gap"],
                        rows, right=["total bytes", "val_bpb", "gap"]))
    if records["gap_bpb"] > 0:
        console.print(f"--budget's gap is {budget['gap_bpb'] / records['gap_bpb']:.2f}x the records' recipe's "
                      "at the same bytes")
