"""`golfquant train`: train the baseline GPT (or the small bundled preset) on challenge-format token shards."""
from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import click
import torch
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from golfquant.data import default_data_dir
from golfquant.train import PRESETS, TrainProgress, apply_overrides, preset, train as run_training
from golfquant_cli import render


@contextlib.contextmanager
def _progress(enabled: bool, steps: int) -> Iterator[Callable[[TrainProgress], None]]:
    """A step bar with train loss and tokens/s on stderr; evaluations print a line above it."""
    if not enabled:
        yield lambda p: None
        return
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=render.status_console) as bar:
        task = bar.add_task("train", total=steps, info="")

        def update(p: TrainProgress) -> None:
            if p.val_bpb is not None:
                bar.console.print(f"step {p.step}: val_loss {p.val_loss:.4f} val_bpb {p.val_bpb:.4f}")
            bar.update(task, completed=p.step,
                       info=f"loss {p.train_loss:.4f}  {p.tokens_per_s:,.0f} tok/s  lr x{p.lr_scale:.2f}")

        yield update


@click.command("train")
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="tiny: the bundled 4x320 model (~10 min on one CPU thread); baseline: the challenge's 9x512.")
@click.option("--steps", type=int, default=None, help="Optimizer steps (overrides the preset).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any model or train config field, e.g. --set model_dim=384 --set matrix_lr=0.03 (repeatable).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with fineweb_train_*.bin, fineweb_val_*.bin [default: the bundled dataset].")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SentencePiece .model for val_bpb [default: DATA/tokenizer.model].")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("out/model.pt"),
              show_default=True, help="Checkpoint to write (state_dict + config).")
@click.option("--seed", type=int, default=None, help="Random seed (overrides the preset).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (config and result) instead of text.")
def train(preset_name, steps, overrides, data_dir, tokenizer, out, seed, threads, as_json):
    """Train a GPT from scratch and write a checkpoint that `golfquant quantize` reads."""
    if threads is not None:
        torch.set_num_threads(threads)
    model_config, train_config = preset(preset_name)
    flags = [f"steps={steps}"] * (steps is not None) + [f"seed={seed}"] * (seed is not None)
    model_config, train_config = apply_overrides(model_config, train_config, [*overrides, *flags])
    data_dir = data_dir if data_dir is not None else default_data_dir()
    tokenizer = tokenizer if tokenizer is not None else data_dir / "tokenizer.model"
    if not as_json:
        rows = [("model", k, v) for k, v in asdict(model_config).items()]
        rows += [("train", k, v) for k, v in asdict(train_config).items()]
        rows += [("data", "dir", data_dir), ("data", "tokenizer", tokenizer), ("out", "path", out)]
        render.console.print(render.table(f"golfquant train --preset {preset_name}", ["group", "key", "value"], rows))

    with _progress(not as_json, train_config.steps) as on_step:
        result = run_training(
            model_config, train_config,
            train_pattern=str(data_dir / "fineweb_train_*.bin"), val_pattern=str(data_dir / "fineweb_val_*.bin"),
            tokenizer_path=tokenizer, out_path=out, progress=on_step,
        )
    if as_json:
        render.emit_json({"model": asdict(model_config), "train": asdict(train_config), "result": asdict(result)})
        return
    render.console.print(
        f"val_bpb {render.fmt_bpb(result.val_bpb)} (val_loss {result.val_loss:.4f}) after {result.steps} steps, "
        f"{result.train_tokens:,} tokens in {result.train_seconds:.0f} s ({result.tokens_per_s:,.0f} tok/s); "
        f"{result.params:,} params -> {result.out_path} ({Path(result.out_path).stat().st_size:,} bytes)"
    )



if __name__ == "__main__":  # `python -m golfquant_cli.train_cmd`, usable before `golfquant` is installed
    train()
