from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from golfquant.data import (BOS_ID, DOC_SEPARATOR, HEADER_BYTES, SHARD_MAGIC, build_byte_luts, build_dataset,
                            check_tokenizer_fits, check_tokens_fit, count_target_bytes, default_tokenizer_path,
                            default_train_pattern, default_val_pattern, load_tokens, read_documents, read_shard,
                            train_tokenizer, write_shard)
from golfquant.errors import DataError

CORPUS = Path(__file__).resolve().parents[1] / "corpus"


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(default_tokenizer_path()))


def small_docs(n_chars: int = 30_000) -> list[str]:
    """Austen chapters and Python doc pages, cut to n_chars each source (fast tokenizer training)."""
    docs = []
    for name in ("austen.txt", "python_docs.txt"):
        used = 0
        for d in read_documents(CORPUS / name):
            if used >= n_chars:
                break
            docs.append(d[:6000])
            used += len(docs[-1])
    return docs


# ---------------------------------------------------------------- shards
def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 2, 1023, 65535, 7], dtype=np.int64)
    path = tmp_path / "s.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * tokens.size
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [SHARD_MAGIC, 1, tokens.size] and not header[3:].any()
    got = read_shard(path)
    assert got.dtype == np.uint16 and got.tolist() == tokens.tolist()


def test_write_shard_rejects_ids_outside_uint16(tmp_path):
    with pytest.raises(DataError, match="uint16"):
        write_shard(tmp_path / "s.bin", [1, 65536])
    assert not (tmp_path / "s.bin").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda raw: (20240521).to_bytes(4, "little") + raw[4:], "bad magic"),
    (lambda raw: raw[:4] + (2).to_bytes(4, "little") + raw[8:], "version"),
    (lambda raw: raw[:-2], "truncated or extended"),
    (lambda raw: raw + b"\0\0", "truncated or extended"),
    (lambda raw: raw[:100], "header"),
])
def test_damaged_shard_raises(tmp_path, damage, message):
    path = tmp_path / "bad.bin"
    write_shard(path, np.arange(10))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=message) as e:
        read_shard(path)
    assert "bad.bin" in str(e.value)


def test_load_tokens_sorted_concat_and_limit(tmp_path):
    write_shard(tmp_path / "x_000001.bin", [5, 6, 7])
    write_shard(tmp_path / "x_000000.bin", [1, 2])
    all_tokens = load_tokens(str(tmp_path / "x_*.bin"))
    assert all_tokens.dtype == torch.int64 and all_tokens.tolist() == [1, 2, 5, 6, 7]
    assert load_tokens(str(tmp_path / "x_*.bin"), max_tokens=3).tolist() == [1, 2, 5]
    with pytest.raises(DataError, match="no token shard"):
        load_tokens(str(tmp_path / "nothing_*.bin"))


# ---------------------------------------------------------------- byte tables on the bundled tokenizer
def test_byte_luts_on_bundled_tokenizer(sp):
    luts = build_byte_luts(default_tokenizer_path(), 1024)
    assert luts.base_bytes.dtype == torch.int16 and luts.base_bytes.numel() == 1024
    the = sp.piece_to_id("\u2581the")
    assert (luts.base_bytes[the], luts.has_leading_space[the], luts.is_boundary[the]) == (3, True, False)
    space = sp.piece_to_id("\u2581")
    assert (luts.base_bytes[space], luts.has_leading_space[space]) == (0, True)
    byte_id = sp.piece_to_id("<0xE2>")
    assert sp.is_byte(byte_id) and luts.base_bytes[byte_id] == 1 and not luts.is_boundary[byte_id]
    assert not luts.has_leading_space[byte_id]
    for special in (0, BOS_ID, 2, 3):
        assert luts.base_bytes[special] == 0 and luts.is_boundary[special]
    for i in range(4, sp.get_piece_size()):
        if not sp.is_byte(i):
            piece = sp.id_to_piece(i)
            assert luts.base_bytes[i] == len(piece.removeprefix("\u2581").encode("utf-8")), piece


def test_luts_larger_model_vocab_pads_with_boundaries():
    luts = build_byte_luts(default_tokenizer_path(), 1100)
    assert luts.base_bytes.numel() == 1100 and luts.tokenizer_vocab == 1024
    assert luts.is_boundary[1024:].all() and not luts.base_bytes[1024:].any()
    check_tokenizer_fits(luts, 1100)
    with pytest.raises(DataError, match="1024 pieces"):
        check_tokenizer_fits(luts, 512)


def test_count_target_bytes_leading_space_after_boundary(sp):
    luts = build_byte_luts(sp, 1024)
    the, word = sp.piece_to_id("\u2581the"), sp.piece_to_id("he")
    prev = torch.tensor([BOS_ID, word, word])
    tgt = torch.tensor([the, the, word])
    assert count_target_bytes(prev, tgt, luts).tolist() == [3, 4, 2]


def test_check_tokens_fit():
    check_tokens_fit(torch.tensor([0, 1023]), 1024)
    with pytest.raises(DataError, match="1024"):
        check_tokens_fit(torch.tensor([0, 1024]), 1024)


def test_bundled_val_tokens_fit_and_count_bytes(sp):
    val = load_tokens(default_val_pattern())
    train = load_tokens(default_train_pattern(), max_tokens=1000)
    assert val[0] == BOS_ID and train[0] == BOS_ID and val.numel() >= 150_000
    check_tokens_fit(val, 1024)
    # The LUT byte count equals the UTF-8 length of the decoded text of one BOS-delimited document.
    doc_end = int((val[1:] == BOS_ID).nonzero()[0]) + 1
    doc = val[:doc_end]
    luts = build_byte_luts(sp, 1024)
    assert int(count_target_bytes(doc[:-1], doc[1:], luts).sum()) == len(sp.decode(doc[1:].tolist()).encode())


# ---------------------------------------------------------------- tokenizer and dataset builder
def test_read_documents_separator(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("one\ntwo" + DOC_SEPARATOR + "three" + DOC_SEPARATOR + "\n" + DOC_SEPARATOR + "four\n")
    assert read_documents(f) == ["one\ntwo", "three", "four"]
    with pytest.raises(DataError, match="not found"):
        read_documents(tmp_path / "missing.txt")


def test_tokenizer_is_deterministic(tmp_path):
    docs = small_docs(15_000)
    a = train_tokenizer(docs, 400, tmp_path / "a.model").read_bytes()
    b = train_tokenizer(docs, 400, tmp_path / "b.model").read_bytes()
    assert a == b
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a.model"))
    assert sp.piece_to_id("\u2581") != sp.unk_id()
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_byte(i)]
    assert not [p for p in pieces if sum(c.isdigit() for c in p) > 1]  # split_digits


def test_build_dataset_bos_before_each_document(tmp_path):
    docs = small_docs()
    text_a, text_b = tmp_path / "a.txt", tmp_path / "b.txt"
    text_a.write_text(DOC_SEPARATOR.join(docs[:5]))
    text_b.write_text(DOC_SEPARATOR.join(docs[5:]))
    out = tmp_path / "out"
    out.mkdir()
    write_shard(out / "fineweb_train_000009.bin", [1, 2])  # stale shard of an earlier build
    s = build_dataset([text_a, text_b], 400, out, val_fraction=0.25, shard_tokens=10_000)
    assert s.docs_val + s.docs_train == len(docs) and s.docs_val == round(0.25 * len(docs))
    assert not (out / "fineweb_train_000009.bin").exists()
    train_files = sorted(out.glob("fineweb_train_*.bin"))
    assert len(train_files) == -(-s.tokens_train // 10_000) > 1
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    decoded = []
    for pattern, n_tokens in ((out / "fineweb_val_*.bin", s.tokens_val), (out / "fineweb_train_*.bin", s.tokens_train)):
        tokens = load_tokens(str(pattern)).numpy()
        assert tokens.size == n_tokens and tokens[0] == BOS_ID and (tokens != 2).all()  # no EOS
        starts = np.flatnonzero(tokens == BOS_ID).tolist() + [tokens.size]
        decoded += [sp.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]
    # Every document appears once, whole, after its own BOS (nmt_nfkc collapses whitespace).
    assert sorted(decoded) == sorted(" ".join(d.split()) for d in docs)
    # Same input, same bytes.
    again = tmp_path / "again"
    build_dataset([text_a, text_b], 400, again, val_fraction=0.25, shard_tokens=10_000)
    for f in out.iterdir():
        assert (again / f.name).read_bytes() == f.read_bytes()
