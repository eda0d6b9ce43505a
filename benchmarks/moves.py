"""What the finer moves buy at equal bytes (issue 14): salient column groups (`--salient`) and the Hadamard
incoherence rotation (`--rotate hadamard`), each against the same plan without the move given the same bytes as
finer steps.

On each checkpoint of benchmarks/checkpoints.py, with one self-generated calibration (64 sequences) shared by every
artifact, for RTN and GPTQ at int4, int5 and int6 on every matrix (the records' per-role SDClip k at that width):
* `plain`: the plan without a move, at its own bytes;
* `+salient` (top=1, group=64, int8) and `+hadamard` (the largest power-of-two block): the plan with the move;
* `plain at the move's bytes`: the plan without the move, its clip factor changed until it fills the moved
  artifact's bytes (allocation.py's secant search, the last ±1 codes pruned): the same bytes spent on finer steps,
  down to the 4-sigma clip floor (bytes beyond it stay unused);
* `--budget at the move's bytes`: the measured allocation without moves (default candidates) given those bytes,
  the best golfquant does with them otherwise.
The move pays where its gap is below both. Then `--budget` at the records' recipe's bytes with the default
candidates, with `--rotate auto` (a rotated twin of every candidate) and with `--salient auto` (salient candidates
on int4, int5 and the records' int6). Every gap is val_bpb on the first --eval-tokens of the bundled validation
split (never used by calibration or the measurement) minus the float model's on the same tokens.

    .venv/bin/python benchmarks/moves.py      # ~40 min on one thread; writes moves.json, prints markdown tables
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from allocation import RECORDS_CLIP, Bench, bench_arguments, uniform
from checkpoints import checkpoints, sha256

from golfquant.atomic import atomic_write_text
from golfquant.options import QuantizeOptions
from golfquant.plan import PlanOptions
from golfquant.quant.clip import RECORD_K, record_k
from golfquant.quant.salient import SalientOptions

OUT = Path(__file__).with_suffix(".json")
WIDTHS = (4, 5, 6)
METHODS = ("rtn", "gptq")
MOVES = {"+salient": {"salient": SalientOptions(top=1, group=64, bits=8)}, "+hadamard": {"rotate": "hadamard"}}
BUDGET_MOVES = {"default candidates": {}, "--rotate auto": {"rotate": "auto"},
                "--salient auto": {"salient": SalientOptions(top=1, group=64, bits=8, auto=True)}}


def records_clip(bits: int) -> str:
    return "sdclip:" + ",".join(f"{role}={round(record_k(role, bits), 4)!r}" for role in RECORD_K)


def run(path: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(path, Path(tmp), args)
        rows = []
        for method in METHODS:
            for bits in WIDTHS:
                base = QuantizeOptions(plan=uniform(bits), clip=records_clip(bits), calib=b.calib, method=method)
                row = {"method": method, "bits": bits, "plain": b.point("plain", *b.quantize(base))}
                for move, change in MOVES.items():
                    moved = b.point(move, *b.quantize(dataclasses.replace(base, **change)))
                    row[move] = moved
                    row[f"plain at {move} bytes"] = b.uniform_at(bits, moved["total_bytes"], method=method)
                    s, out = b.quantize(QuantizeOptions(calib=b.calib, budget=moved["total_bytes"]),
                                        cache=Path(tmp) / "default_candidates")
                    row[f"--budget at {move} bytes"] = b.point("--budget", s, out, chosen_plan=s["chosen_plan"])
                rows.append(row)
        rec_s, rec_out = b.quantize(QuantizeOptions(plan=PlanOptions(mlp="int6", attn="int6", embed="int8",
                                                                     other="int6"), clip=RECORDS_CLIP, calib=b.calib))
        records = b.point("records' recipe", rec_s, rec_out)
        budget = {"records' recipe": records}
        for label, change in BUDGET_MOVES.items():
            s, out = b.quantize(QuantizeOptions(calib=b.calib, budget=records["total_bytes"], **change),
                                cache=Path(tmp) / label.replace(" ", "_").replace("-", ""))
            budget[label] = b.point(label, s, out, chosen_plan=s["chosen_plan"],
                                    moved=sum(" +had" in a["setting"] or "+salient" in a["setting"]
                                              for a in s["allocation"]),
                                    measurement_seconds=s["measurement"]["seconds"])
    return {"checkpoint": path.name, "sha256": sha256(path), "float_bpb": b.float_bpb, "eval_tokens": args.eval_tokens,
            "rows": rows, "budget_at_records_bytes": budget}


def main() -> None:
    args = bench_arguments()
    results = {label: run(path, args) for label, path in checkpoints().items()}
    atomic_write_text(OUT, json.dumps(results, indent=1) + "\n")
    for label, r in results.items():
        print(f"\n{label}: float val_bpb {r['float_bpb']:.4f} on {r['eval_tokens']:,} validation tokens")
        print("| method | width | plain | +salient | plain at its bytes | --budget at its bytes | +hadamard | "
              "plain at its bytes | --budget at its bytes |")
        print("|---|---|---|---|---|---|---|---|---|")
        for x in r["rows"]:
            cells = [x["plain"]] + [x[k] for m in MOVES for k in (m, f"plain at {m} bytes", f"--budget at {m} bytes")]
            print(f"| {x['method']} | int{x['bits']} | "
                  + " | ".join(f"{c['gap_bpb']:+.4f} ({c['total_bytes']:,})" for c in cells) + " |")
        print("\n| at the records' bytes | gap | plan | tensors moved | measurement s |")
        print("|---|---|---|---|---|")
        for k, p in r["budget_at_records_bytes"].items():
            print(f"| {k} | {p['gap_bpb']:+.4f} ({p['total_bytes']:,}) | {p.get('chosen_plan', '')} | "
                  f"{p.get('moved', '')} | {p.get('measurement_seconds', '')} |")


if __name__ == "__main__":
    main()
