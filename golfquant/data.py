"""Token shards, the SentencePiece tokenizer, the byte tables of val_bpb, and the bundled default dataset.

Formats follow the Parameter Golf challenge (brief §1.3/§1.4): a shard is a 256-int32 little-endian header
(magic 20240520, version 1, token count) followed by that many little-endian uint16 token ids; every
document is prefixed with BOS (id 1), no EOS; validation documents come first in a seeded shuffle.
"""
from __future__ import annotations

import glob
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
import torch

from golfquant.atomic import atomic_write_bytes
from golfquant.errors import DataError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPACE_PIECE = "\u2581"
# Corpus files hold documents separated by a line containing only a form feed.
DOC_SEPARATOR = "\n\f\n"
SHARD_NAME_RE = re.compile(r"fineweb_(train|val)_\d{6}\.bin")


# ---------------------------------------------------------------- shards
def write_shard(path: str | Path, tokens: np.ndarray | Sequence[int]) -> None:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise DataError(f"{path}: tokens must be a 1-D sequence, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
        raise DataError(f"{path}: token ids must fit in uint16 (0..65535), got {arr.min()}..{arr.max()}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, arr.size)
    atomic_write_bytes(path, header.tobytes() + arr.astype("<u2").tobytes())


def read_shard(path: str | Path) -> np.ndarray:
    """The shard's tokens as uint16, after checking magic, version and that the size matches the count."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: token shard not found")
    size = p.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{p}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header (truncated?)")
    header = np.fromfile(p, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{p}: bad magic {int(header[0])} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{p}: unsupported shard version {int(header[1])} (expected {SHARD_VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise DataError(
            f"{p}: header says {count} tokens ({expected} bytes) but the file has {size} bytes "
            "(truncated or extended); rebuild the shard"
        )
    return np.fromfile(p, dtype="<u2", count=count, offset=HEADER_BYTES)


def load_tokens(pattern: str, max_tokens: int | None = None) -> torch.Tensor:
    """All shards matching `pattern` (sorted by name), concatenated as an int64 tensor; optionally truncated."""
    files = sorted(glob.glob(str(pattern)))
    if not files:
        raise DataError(f"no token shard matches {pattern!r}; check the path or build one with `golfquant data build`")
    parts, total = [], 0
    for f in files:
        if max_tokens is not None and total >= max_tokens:
            break
        parts.append(read_shard(f))
        total += parts[-1].size
    tokens = np.concatenate(parts)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    return torch.from_numpy(tokens.astype(np.int64))


# ---------------------------------------------------------------- corpus and tokenizer
def read_documents(path: str | Path) -> list[str]:
    """Documents of a UTF-8 text file, separated by DOC_SEPARATOR (a file without one is one document)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{p}: text file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    docs = [d.strip("\n") for d in text.split(DOC_SEPARATOR)]
    return [d for d in docs if d.strip()]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_model_path: str | Path) -> Path:
    """Train the challenge's SentencePiece BPE tokenizer on `texts` (one document each); write the .model.

    Deterministic: one thread, no sentence sampling or shuffling, fixed random seed, so the same texts
    give the same model bytes.
    """
    texts = list(texts)
    if not texts:
        raise DataError("no text to train the tokenizer on; pass at least one non-empty document")
    model = io.BytesIO()
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="nmt_nfkc",
            add_dummy_prefix=False,
            character_coverage=0.999,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            hard_vocab_limit=False,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=1 << 20,  # whole documents are the training "sentences"
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"SentencePiece could not train a {vocab_size}-token tokenizer: {e}") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if sp.piece_to_id(SPACE_PIECE) == sp.unk_id():
        raise DataError(f"the trained tokenizer has no standalone {SPACE_PIECE!r} piece; train on more varied text")
    atomic_write_bytes(out_model_path, model.getvalue())
    return Path(out_model_path)


def load_tokenizer(sp_or_model_path: spm.SentencePieceProcessor | str | Path) -> spm.SentencePieceProcessor:
    if isinstance(sp_or_model_path, spm.SentencePieceProcessor):
        return sp_or_model_path
    p = Path(sp_or_model_path)
    if not p.is_file():
        raise DataError(f"{p}: tokenizer model not found")
    try:
        return spm.SentencePieceProcessor(model_file=str(p))
    except (RuntimeError, OSError) as e:
        raise DataError(f"{p}: not a SentencePiece model ({e})") from None


# ---------------------------------------------------------------- byte tables (val_bpb)
@dataclass(frozen=True)
class ByteLUTs:
    """Per-token tables of the challenge's byte count, sized max(tokenizer vocab, model vocab)."""

    base_bytes: torch.Tensor  # int16: UTF-8 bytes of the piece without its leading "▁"; 1 for byte pieces
    has_leading_space: torch.Tensor  # bool: the piece starts with "▁"
    is_boundary: torch.Tensor  # bool: control/unknown/unused ids and ids beyond the tokenizer's vocab
    tokenizer_vocab: int

    def to(self, device: str | torch.device) -> "ByteLUTs":
        return ByteLUTs(self.base_bytes.to(device), self.has_leading_space.to(device),
                        self.is_boundary.to(device), self.tokenizer_vocab)


def build_byte_luts(sp_or_model_path: spm.SentencePieceProcessor | str | Path, vocab_size: int) -> ByteLUTs:
    sp = load_tokenizer(sp_or_model_path)
    n_sp = sp.get_piece_size()
    # A lone "▁" must exist, else a space before e.g. a digit falls back to 3 byte tokens counted as 3 bytes
    # instead of 1 (challenge issue #897).
    if sp.piece_to_id(SPACE_PIECE) == sp.unk_id():
        raise DataError(f"tokenizer has no standalone {SPACE_PIECE!r} piece, so val_bpb would miscount spaces; "
                        "use a tokenizer trained by `golfquant data build`")
    size = max(n_sp, vocab_size)
    base = np.zeros(size, dtype=np.int16)
    space = np.zeros(size, dtype=np.bool_)
    boundary = np.ones(size, dtype=np.bool_)
    for i in range(n_sp):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_PIECE):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteLUTs(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary), n_sp)


def count_target_bytes(prev: torch.Tensor, tgt: torch.Tensor, luts: ByteLUTs) -> torch.Tensor:
    """Bytes each target stands for: base bytes, plus 1 for its leading space unless `prev` is a boundary."""
    extra = luts.has_leading_space[tgt] & ~luts.is_boundary[prev]
    return luts.base_bytes[tgt].to(torch.int64) + extra.to(torch.int64)


def check_tokenizer_fits(luts_or_sp: ByteLUTs | spm.SentencePieceProcessor, model_vocab: int) -> None:
    """A tokenizer may be smaller than the model's vocab, never larger (the model could not predict its ids)."""
    n = luts_or_sp.tokenizer_vocab if isinstance(luts_or_sp, ByteLUTs) else luts_or_sp.get_piece_size()
    if n > model_vocab:
        raise DataError(f"tokenizer has {n} pieces but the model predicts only {model_vocab} ids; "
                        "use the tokenizer the model was trained with")


def check_tokens_fit(tokens: torch.Tensor, model_vocab: int, source: str = "validation tokens") -> None:
    if tokens.numel() and int(tokens.max()) >= model_vocab:
        raise DataError(f"{source} contain id {int(tokens.max())} but the model's vocab is {model_vocab}; "
                        "use shards tokenized with the model's tokenizer")


# ---------------------------------------------------------------- dataset builder
@dataclass(frozen=True)
class DatasetSummary:
    docs_train: int
    docs_val: int
    tokens_train: int
    tokens_val: int
    val_bytes: int  # challenge byte count of the val targets (all tokens after the first)
    tokenizer_vocab: int
    files: tuple[str, ...]

    @property
    def val_bytes_per_token(self) -> float:
        return self.val_bytes / max(self.tokens_val - 1, 1)


def _write_split(out_dir: Path, split: str, tokens: np.ndarray, shard_tokens: int) -> list[Path]:
    paths = []
    for i, start in enumerate(range(0, max(tokens.size, 1), shard_tokens)):
        path = out_dir / f"fineweb_{split}_{i:06d}.bin"
        write_shard(path, tokens[start:start + shard_tokens])
        paths.append(path)
    return paths


def build_dataset(
    text_files: Sequence[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    shard_tokens: int = 100_000_000,
    seed: int = 1337,
) -> DatasetSummary:
    """Documents -> tokenizer (trained on the train documents) -> BOS-prefixed val and train shards.

    Validation is the first round(val_fraction * docs) documents of a seeded shuffle of the document list
    (files in the given order, documents in file order). Stale shards of a previous build are removed.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    docs = [d for f in text_files for d in read_documents(f)]
    if len(docs) < 2:
        raise DataError(f"need at least 2 documents (one val, one train), found {len(docs)} in {list(map(str, text_files))}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(val_fraction * len(docs))), len(docs) - 1)
    val_docs = [docs[i] for i in order[:n_val]]
    train_docs = [docs[i] for i in order[n_val:]]

    out = Path(out_dir)
    model_path = train_tokenizer(train_docs, vocab_size, out / "tokenizer.model")
    sp = load_tokenizer(model_path)

    def encode(split_docs: list[str]) -> np.ndarray:
        ids = sp.encode(split_docs)
        return np.fromiter((t for d in ids for t in (BOS_ID, *d)), dtype=np.int64)

    val_tokens, train_tokens = encode(val_docs), encode(train_docs)
    written = _write_split(out, "val", val_tokens, shard_tokens) + _write_split(out, "train", train_tokens, shard_tokens)
    for stale in out.iterdir():
        if SHARD_NAME_RE.fullmatch(stale.name) and stale not in written:
            stale.unlink()

    luts = build_byte_luts(sp, vocab_size)
    val_t = torch.from_numpy(val_tokens)
    val_bytes = int(count_target_bytes(val_t[:-1], val_t[1:], luts).sum())
    return DatasetSummary(
        docs_train=len(train_docs), docs_val=len(val_docs),
        tokens_train=int(train_tokens.size), tokens_val=int(val_tokens.size), val_bytes=val_bytes,
        tokenizer_vocab=sp.get_piece_size(), files=tuple(str(p) for p in [model_path, *written]),
    )


# ---------------------------------------------------------------- bundled defaults
def default_data_dir() -> Path:
    return Path(__file__).parent / "assets"


def default_val_pattern() -> str:
    return str(default_data_dir() / "fineweb_val_*.bin")


def default_train_pattern() -> str:
    return str(default_data_dir() / "fineweb_train_*.bin")


def default_tokenizer_path() -> Path:
    return default_data_dir() / "tokenizer.model"
