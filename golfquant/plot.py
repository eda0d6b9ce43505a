"""PNG charts: the rate-distortion sweep (val_bpb against total bytes) and a size report's bytes by group and layer.

matplotlib is optional (`pip install 'golfquant[plot]'`) and imported only when a chart is drawn. Figures are
built with matplotlib's object API on the Agg canvas (no pyplot, no global backend), written atomically, and
saved without the Software tag: the same input gives the same PNG bytes for a given matplotlib version.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from golfquant.atomic import atomic_path
from golfquant.errors import OptionError
from golfquant.report import SizeReport, TensorBytes

_DPI = 110
_STYLES = {"rtn": ("tab:gray", "o"), "gptq": ("tab:blue", "s"), "gptq+lqer": ("tab:purple", "D"),
           "auto": ("tab:green", "^")}
_CAP_NEAR = 1.5  # draw the cap as a line when it is at most this many times the largest point's bytes


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise OptionError("plotting needs matplotlib: pip install 'golfquant[plot]'") from None
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, metadata={"Software": None})
    return Path(path)


def _thousands(axis) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=5))  # room for 7-digit labels with separators
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


def sweep_png(points: Sequence[dict], path, float_bpb: float | None, cap: int) -> Path:
    """val_bpb against total bytes (artifact + code), one line per method, the float model's val_bpb as a
    horizontal line; the byte cap as a vertical line when it is near the points, else an annotation.
    `points`: dicts with method, total_bytes and val_bpb (SweepPoint fields); points without val_bpb are skipped."""
    fig = _figure(8.0, 5.0)  # first: it raises the install hint when matplotlib is missing
    from matplotlib.ticker import FuncFormatter

    ax = fig.add_subplot()
    done = [p for p in points if p.get("val_bpb") is not None and p.get("total_bytes") is not None]
    for method in dict.fromkeys(p["method"] for p in done):
        mine = sorted((p for p in done if p["method"] == method), key=lambda p: p["total_bytes"])
        color, marker = _STYLES.get(method, (None, "o"))
        ax.plot([p["total_bytes"] for p in mine], [p["val_bpb"] for p in mine], marker=marker, color=color,
                label=method, linewidth=1.6, markersize=6)
    if float_bpb is not None:
        ax.axhline(float_bpb, color="black", linestyle="--", linewidth=1.0, label=f"float model ({float_bpb:.4f})")
    largest = max((p["total_bytes"] for p in done), default=0)
    title = "val_bpb against total bytes (artifact + code)"
    if largest and cap <= _CAP_NEAR * largest:
        ax.axvline(cap, color="tab:red", linestyle=":", linewidth=1.5, label=f"cap {cap:,} bytes")
    elif largest:
        title += f"\nall points far below the {cap:,}-byte cap (largest: {100 * largest / cap:.1f}% of it)"
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("total bytes, MB (1 MB = 1,000,000 bytes)")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:.2f}"))
    ax.grid(True, alpha=0.3)
    if done or float_bpb is not None:
        ax.legend(loc="best", fontsize=9)
    if not done:
        ax.text(0.5, 0.5, "no point met its budget", transform=ax.transAxes, ha="center", va="center")
    return _save(fig, path)


def _layer(name: str) -> str:
    m = re.match(r"blocks\.(\d+)\.", name)
    return f"blocks.{m.group(1)}" if m else name.split(".")[0]


def _layer_key(label: str) -> tuple:
    m = re.fullmatch(r"blocks\.(\d+)", label)
    return (0, int(m.group(1)), "") if m else (1, 0, label)


def _bars(ax, title: str, items: dict[str, dict]) -> None:
    """Per row: achieved bytes (codes, then scales / LQER / float data stacked) and the order-0 entropy bound of
    the codes beside them."""
    labels = list(items)
    codes = [items[k]["codes"] for k in labels]
    rest = [items[k]["total"] - items[k]["codes"] for k in labels]
    bound = [items[k]["entropy"] for k in labels]
    ys = range(len(labels))
    h = 0.38
    ax.barh([y - h / 2 for y in ys], codes, height=h, color="tab:blue", label="codes (achieved)")
    ax.barh([y - h / 2 for y in ys], rest, left=codes, height=h, color="tab:orange",
            label="scales, LQER, float data, header")
    if any(b is not None for b in bound):
        ax.barh([y + h / 2 for y in ys], [b or 0.0 for b in bound], height=h, color="tab:blue", alpha=0.35,
                hatch="//", edgecolor="tab:blue", label="codes: order-0 entropy bound")
    for y, c, r in zip(ys, codes, rest):
        ax.text(c + r, y - h / 2, f" {c + r:,}", va="center", fontsize=8)
    ax.margins(x=0.18)
    ax.set_yticks(list(ys), labels)
    ax.invert_yaxis()
    _thousands(ax.xaxis)
    ax.set_xlabel("bytes")
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="x", alpha=0.3)


def _aggregate(tensors: list[TensorBytes], key) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for t in tensors:
        row = out.setdefault(key(t), {"codes": 0, "total": 0, "entropy": None})
        row["codes"] += t.codes_bytes
        row["total"] += t.compressed_bytes
        if t.entropy is not None:
            row["entropy"] = (row["entropy"] or 0.0) + t.entropy.entropy_bytes
    return out


def size_report_png(report: SizeReport, path) -> Path:
    """Bar charts of a size report (golfquant.report.size_report): bytes by role group and by layer (blocks.N,
    then the other top-level names), each with the order-0 entropy bound of the codes (when the report has it)
    beside the achieved bytes."""
    groups = _aggregate(report.tensors, lambda t: t.role)
    groups = {k: groups[k] for k in sorted(groups, key=lambda k: -groups[k]["total"])}
    groups["header + manifest"] = {"codes": 0, "total": report.header_bytes + report.manifest_bytes,
                                   "entropy": None}
    layers = _aggregate(report.tensors, lambda t: _layer(t.name))
    layers = {k: layers[k] for k in sorted(layers, key=_layer_key)}
    fig = _figure(12.0, max(4.0, 1.8 + 0.42 * max(len(layers), len(groups))))
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.25])
    _bars(left, "by role group", groups)
    _bars(right, "by layer", layers)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=9)
    headroom = report.headroom_bytes
    fig.suptitle(f"{report.artifact.name}: {report.artifact_bytes:,} artifact + "
                 f"{report.code_bytes:,} code = {report.total_bytes:,} bytes; "
                 f"{'headroom' if headroom >= 0 else 'OVER by'} {abs(headroom):,} of {report.budget:,}",
                 fontsize=12)
    return _save(fig, path)
