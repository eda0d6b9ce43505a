import math

import pytest
import torch

from golfquant.data import ByteLUTs, build_byte_luts, default_tokenizer_path, default_val_pattern, load_tokens
from golfquant.errors import DataError, OptionError
from golfquant.evaluate import _sliding_batches, eval_val_bpb

V = 6
# id: 0 BOS (boundary) | 1 "▁a" | 2 "bc" | 3 byte piece | 4 "▁" | 5 "▁de"
BASE = [0, 1, 2, 1, 0, 2]
LEAD = [False, True, False, False, True, True]
BOUNDARY = [True, False, False, False, False, False]


def fake_luts() -> ByteLUTs:
    return ByteLUTs(torch.tensor(BASE, dtype=torch.int16), torch.tensor(LEAD), torch.tensor(BOUNDARY), V)


class FixedLogits(torch.nn.Module):
    """Causal toy model: logits = A[token] + B[first token of the sequence] (so context matters)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("A", torch.randn(V, V, generator=g) * 2)
        self.register_buffer("B", torch.randn(V, V, generator=g))

    def forward_logits(self, x):
        return self.A[x] + self.B[x[:, :1]]


class ForwardOnly(torch.nn.Module):
    """FixedLogits' logits from forward(idx) alone, as a user model without forward_logits gives them."""

    def __init__(self):
        super().__init__()
        self.fixed = FixedLogits()

    def forward(self, x):
        return self.fixed.forward_logits(x)


def nll(model, first, tok, nxt):
    row = [float(model.A[tok, k] + model.B[first, k]) for k in range(V)]
    return math.log(sum(math.exp(r) for r in row)) - row[nxt]


def target_bytes(prev, tgt):
    return BASE[tgt] + (1 if LEAD[tgt] and not BOUNDARY[prev] else 0)


def expected(loss, count, nbytes):
    val_loss = loss / count
    return val_loss, val_loss / math.log(2) * count / nbytes


def tokens_for(n, seed=1):
    t = torch.randint(1, V, (n,), generator=torch.Generator().manual_seed(seed))
    t[0] = 0
    t[n // 3] = 0  # a document boundary mid-stream
    return t


def test_non_overlapping_matches_hand_computation():
    model, L = FixedLogits(), 4
    tokens = tokens_for(15)  # (15-1)//4 = 3 sequences; the last 2 targets are dropped
    t = tokens.tolist()
    loss = nbytes = count = 0
    for s in range(3):
        for j in range(L):
            p = s * L + j
            loss += nll(model, t[s * L], t[p], t[p + 1])
            nbytes += target_bytes(t[p], t[p + 1])
            count += 1
    r = eval_val_bpb(model, tokens, fake_luts(), seq_len=L, batch_seqs=2)
    exp_loss, exp_bpb = expected(loss, count, nbytes)
    assert (r.tokens, r.bytes) == (12, nbytes)
    assert r.val_loss == pytest.approx(exp_loss, rel=1e-6)
    assert r.val_bpb == pytest.approx(exp_bpb, rel=1e-6)


def test_leading_space_rule_after_boundary():
    model = FixedLogits()
    # BOS then "▁a": the space after BOS is not counted; "▁a" after "bc" counts 2 bytes.
    tokens = torch.tensor([0, 1, 2, 1, 4])
    r = eval_val_bpb(model, tokens, fake_luts(), seq_len=4)
    assert r.bytes == 1 + 2 + 2 + 1


@pytest.mark.parametrize("n, L, stride", [(21, 4, 1), (22, 4, 2), (23, 5, 3), (12, 4, 4), (30, 8, 3)])
def test_sliding_matches_hand_computation_and_scores_each_target_once(n, L, stride):
    model, tokens = FixedLogits(), tokens_for(n)
    t = tokens.tolist()
    # The records' load_validation_tokens keeps whole sequences: the first ((n-1)//L)*L targets.
    n_targets = (n - 1) // L * L
    # Brief §1.5, written out independently: window ws is kept if ws + L - stride < n_targets; the first
    # window scores everything, later windows from L - stride to their end.
    scored = [0] * n_targets
    loss = nbytes = 0
    for ws in range(0, n_targets, stride):
        if ws + L - stride >= n_targets:
            continue
        for j in range(0 if ws == 0 else L - stride, min(L, n_targets - ws)):
            p = ws + j
            scored[p] += 1
            loss += nll(model, t[ws], t[p], t[p + 1])
            nbytes += target_bytes(t[p], t[p + 1])
    assert scored == [1] * n_targets
    r = eval_val_bpb(model, tokens, fake_luts(), seq_len=L, stride=stride, batch_seqs=3)
    exp_loss, exp_bpb = expected(loss, n_targets, nbytes)
    assert (r.tokens, r.bytes) == (n_targets, nbytes)
    assert r.val_loss == pytest.approx(exp_loss, rel=1e-6)
    assert r.val_bpb == pytest.approx(exp_bpb, rel=1e-6)


@pytest.mark.parametrize("n, L, stride", [(101, 7, 3), (64, 16, 5), (50, 10, 1)])
def test_sliding_masks_cover_every_target_once(n, L, stride):
    tokens = torch.arange(n)
    counts = torch.zeros(n - 1, dtype=torch.int64)
    for b in _sliding_batches(tokens, L, stride, batch_seqs=4):
        # x holds the stream positions themselves, so each scored cell names its target position.
        counts.index_add_(0, b.x[b.scored], torch.ones(int(b.scored.sum()), dtype=torch.int64))
        assert torch.equal(b.y[b.scored], b.x[b.scored] + 1)
    assert counts.tolist() == [1] * (n - 1)


def test_sliding_with_stride_equal_seq_len_equals_non_overlapping():
    model, L = FixedLogits(), 5
    tokens = tokens_for(4 * L + 4)  # a tail of 3 targets that neither path scores
    a = eval_val_bpb(model, tokens, fake_luts(), seq_len=L)
    b = eval_val_bpb(model, tokens, fake_luts(), seq_len=L, stride=L, batch_seqs=3)
    assert a.tokens == b.tokens == 4 * L and a.bytes == b.bytes
    assert a.val_loss == pytest.approx(b.val_loss, rel=1e-12)


@pytest.mark.parametrize("n, max_tokens", [(47, None), (64, 38), (41, None)])
@pytest.mark.parametrize("stride", [1, 3, 6])
def test_sliding_and_non_overlapping_score_the_same_targets(n, max_tokens, stride):
    """Same targets, so the same token and byte counts: the sliding path drops the tail the records drop."""
    model, L, luts = FixedLogits(), 6, fake_luts()
    tokens = tokens_for(n)
    a = eval_val_bpb(model, tokens, luts, seq_len=L, max_tokens=max_tokens)
    b = eval_val_bpb(model, tokens, luts, seq_len=L, stride=stride, max_tokens=max_tokens, batch_seqs=4)
    t = tokens.tolist()[:n if max_tokens is None else max_tokens + 1]
    kept = (len(t) - 1) // L * L
    assert a.tokens == b.tokens == kept < len(t) - 1
    assert a.bytes == b.bytes == sum(target_bytes(p, q) for p, q in zip(t[:kept], t[1:kept + 1]))


def test_max_tokens_and_errors():
    model, tokens = FixedLogits(), tokens_for(40)
    a = eval_val_bpb(model, tokens, fake_luts(), seq_len=4, max_tokens=20)
    b = eval_val_bpb(model, tokens[:21], fake_luts(), seq_len=4)
    assert a == b and a.tokens == 20
    with pytest.raises(DataError, match="seq_len"):
        eval_val_bpb(model, tokens[:4], fake_luts(), seq_len=4)
    with pytest.raises(OptionError, match="stride"):
        eval_val_bpb(model, tokens, fake_luts(), seq_len=4, stride=5)
    with pytest.raises(DataError, match="vocab"):
        eval_val_bpb(model, torch.tensor([0, 1, 2, 6, 1, 2]), fake_luts(), seq_len=4)
    model.train()
    calls = []
    eval_val_bpb(model, tokens, fake_luts(), seq_len=4, batch_seqs=4, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)] and model.training


@pytest.mark.parametrize("stride", [None, 3])
def test_a_model_with_only_forward_is_evaluated_on_its_forward_logits(stride):
    tokens = tokens_for(30)
    a = eval_val_bpb(FixedLogits(), tokens, fake_luts(), seq_len=4, stride=stride)
    b = eval_val_bpb(ForwardOnly(), tokens, fake_luts(), seq_len=4, stride=stride)
    assert a == b


def test_a_model_returning_no_logits_is_an_option_error():
    class LossOnly(torch.nn.Module):
        def forward(self, x):
            return x.float().mean()

    with pytest.raises(OptionError, match="logits"):
        eval_val_bpb(LossOnly(), tokens_for(30), fake_luts(), seq_len=4)


def test_uniform_model_on_bundled_val_gives_log_vocab_over_bytes_per_token():
    class Uniform(torch.nn.Module):
        def forward_logits(self, x):
            return torch.zeros(*x.shape, 1024)

    luts = build_byte_luts(default_tokenizer_path(), 1024)
    tokens = load_tokens(default_val_pattern(), max_tokens=4096)
    r = eval_val_bpb(Uniform(), tokens, luts, seq_len=512, batch_seqs=4)
    assert r.val_loss == pytest.approx(math.log(1024), rel=1e-6)
    assert r.val_bpb == pytest.approx(10 * r.tokens / r.bytes, rel=1e-6)
    assert 2.0 < r.bytes / r.tokens < 5.0  # sanity: roughly 2-5 bytes per token on English
