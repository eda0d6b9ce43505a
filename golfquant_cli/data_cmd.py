"""`golfquant data build`: text documents -> tokenizer + challenge-format token shards."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from golfquant.data import build_dataset
from golfquant_cli.render import console, emit_json, table


@click.group("data")
def data() -> None:
    """Build tokenizers and token shards."""


@data.command("build")
@click.argument("text_files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--vocab", default=1024, show_default=True, help="Tokenizer vocabulary size.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for tokenizer.model and fineweb_{val,train}_*.bin.")
@click.option("--val-fraction", default=0.1, show_default=True,
              help="Share of documents (seeded shuffle) that become validation.")
@click.option("--shard-tokens", default=100_000_000, show_default=True, help="Tokens per shard file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def build(text_files: tuple[Path, ...], vocab: int, out_dir: Path, val_fraction: float, shard_tokens: int,
          as_json: bool) -> None:
    """Train a SentencePiece BPE tokenizer and write BOS-prefixed shards from TEXT_FILES.

    Documents in a file are separated by a line holding only a form feed.
    """
    s = build_dataset(text_files, vocab, out_dir, val_fraction=val_fraction, shard_tokens=shard_tokens)
    if as_json:
        emit_json({**dataclasses.asdict(s), "files": list(s.files), "val_bytes_per_token": s.val_bytes_per_token})
        return
    rows = [
        ("val", s.docs_val, f"{s.tokens_val:,}"),
        ("train", s.docs_train, f"{s.tokens_train:,}"),
    ]
    console.print(table(f"dataset in {out_dir}", ["split", "docs", "tokens"], rows, right=["docs", "tokens"]))
    console.print(f"tokenizer: {s.tokenizer_vocab} pieces, {s.val_bytes_per_token:.3f} bytes/token on val")
    for f in s.files:
        console.print(f"  {f}")
