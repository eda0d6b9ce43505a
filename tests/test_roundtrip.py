"""roundtrip_eval on models golfquant did not write: logits from forward(idx), the sequence length the model declares,
and the whole validation split by default."""
from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from golfquant.artifact import write_artifact
from golfquant.checkpoint import load_checkpoint, save_checkpoint
from golfquant.data import load_tokens
from golfquant.errors import OptionError
from golfquant.factory import load_model_factory
from golfquant.roundtrip import RoundtripOptions, roundtrip_eval
from golfquant_cli.main import cli

from helpers import TOKENIZER, val_shard

# vocab 1024: the bundled tokenizer's, so its byte tables fit the model.
USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    class TinyLM(nn.Module):
        """Logits from forward(idx) alone; states a sequence length only when given one."""

        def __init__(self, vocab, dim, seq_len=None, train_seq_len=None):
            super().__init__()
            if seq_len is not None:
                self.seq_len = seq_len
            if train_seq_len is not None:
                self.train_seq_len = train_seq_len
            self.embed = nn.Embedding(vocab, dim)
            self.head = nn.Linear(dim, vocab, bias=False)

        def forward(self, idx):
            return self.head(torch.tanh(self.embed(idx).cumsum(1)))  # causal: position t sees tokens <= t
''')
SIZE = {"vocab": 1024, "dim": 8}
VAL_TOKENS = 70_001  # more than the 65,536 that RoundtripOptions once kept by default


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """(model file, checkpoint, float artifact of it, validation shard) of a TinyLM."""
    folder = tmp_path_factory.mktemp("user_model")
    source = folder / "user_model.py"
    source.write_text(USER_MODEL)
    torch.manual_seed(0)
    sd = load_model_factory(f"{source}:TinyLM", SIZE)().state_dict()
    save_checkpoint(folder / "tiny.pt", sd, None)
    write_artifact(folder / "tiny.gqa", sd, None, codecs=["zlib"])
    return source, folder / "tiny.pt", folder / "tiny.gqa", val_shard(folder / "val.bin", VAL_TOKENS)


def _options(user, model_args: dict, **overrides) -> RoundtripOptions:
    source, _, _, val = user
    return RoundtripOptions(val_pattern=str(val), tokenizer=str(TOKENIZER), model_spec=f"{source}:TinyLM",
                            model_args=SIZE | model_args, **overrides)


def test_defaults_evaluate_every_token_with_the_models_forward(user):
    source, ckpt, artifact, val = user
    r = roundtrip_eval(artifact, ckpt, _options(user, {"seq_len": 16}))
    assert (r.seq_len, r.float_model.tokens) == (16, (VAL_TOKENS - 1) // 16 * 16)
    # val_loss written out: the mean cross-entropy of forward(idx) over the contiguous 16-token sequences
    model = load_model_factory(f"{source}:TinyLM", SIZE)()
    model.load_state_dict(load_checkpoint(ckpt).state_dict)
    tokens = load_tokens(str(val))[:r.float_model.tokens + 1]
    with torch.no_grad():
        loss = F.cross_entropy(model(tokens[:-1].view(-1, 16)).flatten(0, 1), tokens[1:])
    assert r.float_model.val_loss == pytest.approx(float(loss), rel=1e-5)
    assert r.quantized == r.float_model  # a float artifact: the same weights
    assert math.isfinite(r.float_model.val_bpb)


@pytest.mark.parametrize("declared", ["seq_len", "train_seq_len"])
def test_seq_len_is_the_one_the_model_declares_unless_given(user, declared):
    _, ckpt, artifact, _ = user
    assert roundtrip_eval(artifact, ckpt, _options(user, {declared: 32}, max_tokens=256)).seq_len == 32
    assert roundtrip_eval(artifact, ckpt, _options(user, {declared: 32}, max_tokens=256, seq_len=8)).seq_len == 8


def test_a_model_that_declares_no_seq_len_needs_one(user):
    _, ckpt, artifact, _ = user
    with pytest.raises(OptionError, match="does not state its sequence length.*--seq-len"):
        roundtrip_eval(artifact, ckpt, _options(user, {}, max_tokens=256))
    r = roundtrip_eval(artifact, ckpt, _options(user, {}, max_tokens=256, seq_len=8))
    assert (r.seq_len, r.float_model.tokens) == (8, 256)


def test_the_cli_asks_for_seq_len_on_one_line(user):
    source, ckpt, artifact, val = user
    res = CliRunner().invoke(cli, ["roundtrip-eval", str(artifact), "--ckpt", str(ckpt), "--val", str(val),
                                   "--tokenizer", str(TOKENIZER), "--model", f"{source}:TinyLM",
                                   *(f"--model-args={k}={v}" for k, v in SIZE.items())])
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and "--seq-len" in res.stderr, res.stderr
