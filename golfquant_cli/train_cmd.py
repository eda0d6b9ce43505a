"""`golfquant train`: train the baseline GPT (or the small bundled preset) on challenge-format token shards.

Runs as one process or under `torchrun --nproc_per_node=N -m golfquant_cli.main train ...` (DDP: NCCL on
GPUs, gloo on CPU); only rank 0 prints and writes the checkpoint. The global batch is the preset's on every N
(golfquant/train/batches.py): the N processes share its micro-batches, or split a micro-batch when there are
fewer micro-batches than processes, so no flag changes with N.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import click
import torch

from golfquant import distributed
from golfquant.data import default_data_dir
from golfquant.errors import GolfquantError
from golfquant.model import GPTConfig
from golfquant.train import (PRESETS, BatchLayout, TrainConfig, TrainProgress, apply_overrides, batch_layout, preset,
                             train as run_training)
from golfquant_cli import render


def quantize_default_clip() -> str:
    """`golfquant quantize`'s default --clip: QAT trains against the grid quantize will use."""
    from golfquant_cli.quantize_cmd import quantize

    return next(p.default for p in quantize.params if p.name == "clip")


def _line(p: TrainProgress) -> str:
    """A log line in the challenge baseline's style."""
    text = (f"step:{p.step}/{p.steps} train_loss:{p.train_loss:.4f} train_time:{p.train_seconds * 1000:.0f}ms "
            f"step_avg:{p.train_seconds * 1000 / p.step:.2f}ms lr_scale:{p.lr_scale:.4f}" + " qat:on" * p.qat)
    if p.val_bpb is not None:
        text += f" val_loss:{p.val_loss:.4f} val_bpb:{p.val_bpb:.4f}"
    return text


@contextlib.contextmanager
def _progress(mode: str, steps: int, log_every: int) -> Iterator[Callable[[TrainProgress], None]]:
    """bar: a step bar on stderr (a terminal); lines: a log line every log_every steps and at evals; off."""
    if mode == "off":
        yield lambda p: None
        return
    if mode == "lines":
        def log(p: TrainProgress) -> None:
            if p.step % log_every == 0 or p.step <= 10 or p.val_bpb is not None:
                click.echo(_line(p))

        yield log
        return
    with render.stage_progress(enabled=True) as bar:
        def update(p: TrainProgress) -> None:
            if p.val_bpb is not None:
                render.status_console.print(f"step {p.step}: val_loss {p.val_loss:.4f} val_bpb {p.val_bpb:.4f}")
            bar("train steps", p.step, steps, info=f"loss {p.train_loss:.4f}  {p.tokens_per_s:,.0f} tok/s  "
                                                   f"lr x{p.lr_scale:.2f}" + "  qat" * p.qat)

        yield update


@click.command("train")
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="tiny: the bundled 4x320 model (~10 min on one CPU thread), 4,096 tokens per step as one "
                   "micro-batch; baseline: the challenge's 9x512, 524,288 tokens per step as 8 micro-batches.")
@click.option("--steps", type=int, default=None, help="Optimizer steps (overrides the preset).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any model or train config field, e.g. --set model_dim=384 --set matrix_lr=0.03 (repeatable). "
                   "batch_tokens is the global batch (per step, all processes together) and grad_accum_steps the "
                   "micro-batches it is written as (all processes together, not per process).")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder with fineweb_train_*.bin, fineweb_val_*.bin [default: the bundled dataset].")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SentencePiece .model for val_bpb [default: DATA/tokenizer.model].")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("out/model.pt"),
              show_default=True, help="Checkpoint to write (state_dict + config).")
@click.option("--max-wallclock", type=float, default=None, metavar="SECONDS",
              help="Stop before the step that would pass this much training time (the challenge: 600).")
@click.option("--ema", type=float, default=None, metavar="DECAY",
              help="Keep an EMA of the weights (e.g. 0.997); the checkpoint holds it.")
@click.option("--compile/--no-compile", "use_compile", default=None, help="torch.compile the training forward pass.")
@click.option("--qat", default=None, metavar="ROLE=intN,...",
              help="Fake-quantize these roles' weights late in training, e.g. mlp=int4,attn=int6.")
@click.option("--qat-start", type=float, default=None, metavar="FRACTION",
              help="Fraction of training (steps, or the wallclock cap) where QAT starts [default: 0.85].")
@click.option("--qat-clip", default=None, metavar="SPEC",
              help="QAT's clip (amax, pct:P, mse, sdclip:...) [default: quantize's default --clip].")
@click.option("--resume", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Continue a run from its checkpoint: step, optimizer states, schedule and data position.")
@click.option("--seed", type=int, default=None, help="Random seed (overrides the preset).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
@click.option("--log-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Steps between log lines when stderr is not a terminal.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (config, per-step log and result) instead of text.")
def train(preset_name, steps, overrides, data_dir, tokenizer, out, max_wallclock, ema, use_compile, qat, qat_start,
          qat_clip, resume, seed, threads, log_every, as_json):
    """Train a GPT (from scratch, or --resume) and write a checkpoint that `golfquant quantize` reads.

    Data-parallel over N processes: torchrun --standalone --nproc_per_node=N -m golfquant_cli.main train ...

    The global batch stays the preset's (batch_tokens per step, as grad_accum_steps micro-batches) for every N:
    each process runs grad_accum_steps/N micro-batches, or a 1/N share of one when N is larger (the tiny preset
    on 2 processes: 8 of its 16 sequences each). N must split the batch into whole sequences; otherwise the
    run stops before any work, saying which N or batch_tokens would.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    env = distributed.init_from_env()
    try:
        _train(env, preset_name, steps, overrides, data_dir, tokenizer, out, max_wallclock, ema, use_compile, qat,
               qat_start, qat_clip, resume, seed, log_every, as_json)
    finally:
        distributed.shutdown()


def _train(env, preset_name, steps, overrides, data_dir, tokenizer, out, max_wallclock, ema, use_compile, qat,
           qat_start, qat_clip, resume, seed, log_every, as_json):
    flags = {"steps": steps, "seed": seed, "max_wallclock_seconds": max_wallclock, "ema_decay": ema,
             "compile": use_compile, "qat": qat, "qat_start": qat_start, "qat_clip": qat_clip}
    try:
        model_config, train_config, layout = _configs(env, preset_name, overrides, flags)
    except GolfquantError:
        # The configs depend on the command line only, so every rank fails alike: rank 0 says why, once, and
        # fails the run; the others leave quietly with status 0, so torchrun cannot stop rank 0 before it speaks.
        if env.is_main:
            raise
        raise click.exceptions.Exit(0) from None
    data_dir = data_dir if data_dir is not None else default_data_dir()
    tokenizer = tokenizer if tokenizer is not None else data_dir / "tokenizer.model"
    talk = env.is_main and not as_json
    if talk:
        rows = [("model", k, v) for k, v in asdict(model_config).items()]
        rows += [("train", k, v) for k, v in asdict(train_config).items()]
        rows += [("data", "dir", data_dir), ("data", "tokenizer", tokenizer), ("out", "path", out),
                 ("run", "processes", env.world_size), ("run", "micro-batches", layout.describe()),
                 ("run", "resume", resume or "-")]
        render.console.print(render.table(f"golfquant train --preset {preset_name}", ["group", "key", "value"], rows))

    log: list[TrainProgress] = []
    mode = "bar" if render.status_console.is_terminal else "lines"
    with _progress(mode if talk else "off", train_config.steps, log_every) as on_step:
        def record(p: TrainProgress) -> None:
            log.append(p)
            on_step(p)

        result = run_training(
            model_config, train_config,
            train_pattern=str(data_dir / "fineweb_train_*.bin"), val_pattern=str(data_dir / "fineweb_val_*.bin"),
            tokenizer_path=tokenizer, out_path=out, progress=record, resume=resume,
        )
    if not env.is_main:
        return
    if as_json:
        render.emit_json({"model": asdict(model_config), "train": asdict(train_config), "layout": asdict(layout),
                          "result": asdict(result), "log": [asdict(p) for p in log]})
        return
    stop = " (stopped by the wallclock cap)" if result.stopped_by_wallclock else ""
    click.echo(f"final val_loss:{result.val_loss:.4f} val_bpb:{result.val_bpb:.4f} steps:{result.steps}{stop}")
    render.console.print(
        f"val_bpb {render.fmt_bpb(result.val_bpb)} (val_loss {result.val_loss:.4f}) after {result.steps} steps, "
        f"{result.train_tokens:,} tokens in {result.train_seconds:.0f} s ({result.tokens_per_s:,.0f} tok/s) on "
        f"{result.world_size} process(es); {result.params:,} params -> {result.out_path} "
        f"({Path(result.out_path).stat().st_size:,} bytes)"
    )


def _configs(env, preset_name, overrides, flags) -> tuple[GPTConfig, TrainConfig, BatchLayout]:
    """(model config, train config, micro-batching on this world size): the preset, then --set, then the typed
    flags; OptionError before any work when the processes cannot share the global batch."""
    model_config, train_config = preset(preset_name)
    items = [*overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]  # typed flags win over --set
    model_config, train_config = apply_overrides(model_config, train_config, items)
    if train_config.qat and not any(item.strip().startswith("qat_clip=") for item in items):
        train_config = dataclasses.replace(train_config, qat_clip=quantize_default_clip())
    layout = batch_layout(train_config.batch_tokens, train_config.grad_accum_steps, model_config.seq_len,
                          env.world_size)
    return model_config, train_config, layout


if __name__ == "__main__":  # `python -m golfquant_cli.train_cmd`, usable before `golfquant` is installed
    train()
