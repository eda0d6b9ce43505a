"""How far the model's predictions move when one weight matrix is quantized: the damage the budget allocation buys.

The damage of replacing W by Ŵ = W - E is the KL divergence from the float model's next-token distribution to the
perturbed model's, in nats per token. At the float model the KL's first-order term vanishes, and to second order
it is ½ E_t[δoᵀ F δo], δo the change of the layer's output and F the Fisher information of the loss with respect
to that output. Per kind of tensor:

* linear layer o = W x: δo = E x. Keeping F's diagonal, f_i = E_t[(∂ℓ/∂o_i)²] (one backward pass over held-out
  tokens), and the input Hessian H = E_t[x xᵀ] (the GPTQ Hessian), damage = ½ Σ_i f_i (E H Eᵀ)_ii;
* embedding rows read by token id (the input role of a tied embedding): F_in[v, j] = E_t[1(x_t = v) (∂ℓ/∂e_t)_j²],
  damage = ½ Σ_vj F_in[v, j] E[v, j]²: a row no held-out token reads costs nothing in this role;
* the tied LM head z = h Wᵀ (the output role): the softmax Fisher is used whole, not its diagonal, since a
  perturbation shared by all logits changes nothing: damage = ½ E_t[Σ_v p_v δz_v² - (Σ_v p_v δz_v)²] with
  δz = c ⊙ (h Eᵀ), c the slope of the logit softcap, over up to `head_positions` held-out positions.

f and F_in come from the gradient of the cross-entropy of held-out tokens (sampled from the float model itself)
with respect to every layer output: the empirical Fisher on the model's own samples. Damages of different tensors
add (cross-layer terms dropped), which the budget search checks by measuring whole plans.

Why this signal: benchmarks/sensitivity.py measures, on two checkpoints, the KL of a forward pass with one tensor
quantized at a time, for every tensor x candidate; this damage ranks those measurements with Spearman ~0.99,
against ~0.6 for the Hessian-weighted error tr(E H Eᵀ) the allocation used before, which cannot see how much a
layer's output matters downstream (the measured KL per unit of tr(E H Eᵀ) spans five orders of magnitude across
tensors), nor the embedding's input role.

A tensor with none of these signals (a parameter read by neither an nn.Linear nor an nn.Embedding, e.g. a
parameter bank) has no estimate (`damage` returns None); callers measure it with forward passes
(`plan_divergence`).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from golfquant.calib import Hessian, StageProgress, hessian_targets, model_logits

HEAD_POSITIONS = 1024  # held-out positions the exact head damage averages over (cost: positions x vocab x dim)
# Tokens per forward (and backward) pass: bounds the activations and logits held at once (a backward pass holds
# every layer's activations for all its tokens); the results do not depend on it.
BATCH_TOKENS = 2048
_KL_POSITIONS = 256  # positions per step of a KL sum


def _sequences_per_pass(tokens: torch.Tensor) -> int:
    return max(1, BATCH_TOKENS // tokens.shape[1])


@dataclass
class HeadFisher:
    """What the output-role damage of a tied embedding needs, at a sample of held-out positions."""

    hidden: torch.Tensor  # [n, d] the LM head's input (final_norm output)
    probs: torch.Tensor  # [n, V] the float model's next-token probabilities
    slope: torch.Tensor  # [n, V] d logit / d z: the softcap's slope (ones without a softcap)


@dataclass
class Sensitivity:
    """Per-tensor second-order sensitivities measured on held-out tokens; `damage` turns an error into nats."""

    out_fisher: dict[str, torch.Tensor]  # Linear weight name -> f [out_features]
    in_fisher: dict[str, torch.Tensor]  # embedding weight name -> F_in [V, d], already divided by the tokens
    head: dict[str, HeadFisher]  # tied embedding weight name -> the head's sample
    hessians: dict[str, Hessian]
    tokens: int
    device: torch.device  # the model's: damages are computed there

    def has_signal(self, name: str) -> bool:
        return (name in self.out_fisher and name in self.hessians) or name in self.in_fisher or name in self.head

    def damage(self, name: str, w: torch.Tensor, w_hat: torch.Tensor, row_errors: torch.Tensor | None = None
               ) -> float | None:
        """½ δᵀFδ of replacing w by w_hat (nats per token), or None when this tensor has no signal. row_errors:
        diag(E H Eᵀ) when the caller has it (a GPTQ sweep's, golfquant.quant.gptq)."""
        if not self.has_signal(name):
            return None
        device = self.device
        e = w.to(device).float() - w_hat.to(device).float()
        total = 0.0
        if name in self.out_fisher and name in self.hessians:
            rows = row_errors.to(device) if row_errors is not None else \
                ((e @ self.hessians[name].H.to(device).float()) * e).sum(dim=-1)
            total += float((self.out_fisher[name] * rows).sum(dtype=torch.float64))
        if name in self.in_fisher:
            total += float((self.in_fisher[name] * e * e).sum(dtype=torch.float64))
        if name in self.head:
            total += _head_damage(self.head[name], e)
        return 0.5 * total


def _head_damage(head: HeadFisher, e: torch.Tensor) -> float:
    """E_t[Σ_v p_v δz_v² - (Σ_v p_v δz_v)²] (twice the damage) over the sampled positions."""
    dz = (head.hidden @ e.T) * head.slope  # [n, V]
    p = head.probs
    per_pos = (p * dz * dz).sum(dim=-1) - (p * dz).sum(dim=-1) ** 2
    return float(per_pos.mean(dtype=torch.float64))


def _softcap(model: nn.Module) -> float | None:
    cap = getattr(getattr(model, "config", None), "logit_softcap", None)
    return float(cap) if isinstance(cap, (int, float)) and cap > 0 else None


def measure_sensitivity(model: nn.Module, tokens: torch.Tensor, hessians: dict[str, Hessian],
                        head_positions: int = HEAD_POSITIONS, progress: StageProgress | None = None) -> Sensitivity:
    """Fisher diagonals of every Linear output and embedding lookup, and the tied head's sample, from the
    cross-entropy of `tokens` [N, L] (each sequence predicts its own next tokens) under the float model.

    One forward and backward pass per BATCH_TOKENS tokens' worth of sequences; the model's parameters are left as they were (their
    gradients are cleared)."""
    linears, emb = hessian_targets(model)
    embeddings = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    out_acc: dict[str, torch.Tensor] = {}
    in_acc: dict[str, torch.Tensor] = {}
    handles = []

    def on_linear(name: str):
        def hook(_mod, _args, out):
            if out.requires_grad:
                out.register_hook(lambda g: _add(out_acc, name, (g.detach().float() ** 2).reshape(-1, g.shape[-1]).sum(0)))
        return hook

    def on_embedding(name: str, vocab: int):
        def hook(_mod, args, out):
            ids = args[0].reshape(-1)
            out = out.detach().requires_grad_()  # a leaf: every later output gets its gradient, no weight does

            def grad_hook(g):
                acc = in_acc.setdefault(name, torch.zeros(vocab, g.shape[-1], dtype=torch.float32, device=g.device))
                acc.index_add_(0, ids, (g.detach().float() ** 2).reshape(-1, g.shape[-1]))
            out.register_hook(grad_hook)
            return out
        return hook

    hidden: list[torch.Tensor] = []
    for name, m in linears.items():
        handles.append(m.register_forward_hook(on_linear(name)))
    for name, m in embeddings.items():
        handles.append(m.register_forward_hook(on_embedding(name, m.num_embeddings)))
    if emb is not None:
        handles.append(model.final_norm.register_forward_hook(lambda _m, _a, out: hidden.append(out.detach())))
    device = next(model.parameters()).device
    n_seq = tokens.shape[0]
    # Head sample: evenly spaced positions of every sequence, the same for any batch size.
    per_seq = max(1, min(tokens.shape[1] - 1, -(-head_positions // n_seq)))
    cols = torch.linspace(0, tokens.shape[1] - 2, per_seq).round().long().unique()
    head_h, head_p, head_c = [], [], []
    cap = _softcap(model)
    was_training = model.training
    # Gradients start at the embedding outputs (leaves), so no parameter needs one (nor holds its inputs for it);
    # a model without an nn.Embedding needs its parameters'. The flags are put back afterwards.
    wanted = not embeddings
    toggled = [p for p in model.parameters() if p.requires_grad != wanted]
    for p in toggled:
        p.requires_grad_(wanted)
    model.eval()
    try:
        with torch.enable_grad(), _checkpointed(model):
            for start in range(0, n_seq, _sequences_per_pass(tokens)):
                seq = tokens[start:start + _sequences_per_pass(tokens)].to(device)
                hidden.clear()
                logits = model_logits(model, seq[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1),
                                       reduction="sum")
                loss.backward()
                if emb is not None:
                    z = logits.detach().float()[:, cols]
                    head_h.append(hidden[-1][:, cols].float().reshape(-1, hidden[-1].shape[-1]))
                    head_p.append(torch.softmax(z, dim=-1).reshape(-1, z.shape[-1]))
                    slope = 1.0 - (z / cap) ** 2 if cap is not None else torch.ones_like(z)
                    head_c.append(slope.reshape(-1, z.shape[-1]))
                del logits, loss
                if progress is not None:
                    progress(min(start + _sequences_per_pass(tokens), n_seq), n_seq)
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.grad = None
        for p in toggled:
            p.requires_grad_(not wanted)
        model.train(was_training)
    count = n_seq * (tokens.shape[1] - 1)
    head = {}
    if emb is not None:
        head[emb] = HeadFisher(torch.cat(head_h), torch.cat(head_p), torch.cat(head_c))
    return Sensitivity({k: v / count for k, v in out_acc.items()}, {k: v / count for k, v in in_acc.items()},
                       head, hessians, count, device)


@contextlib.contextmanager
def _checkpointed(model: nn.Module):
    """Every module of the model's nn.ModuleLists (a transformer's blocks) recomputed in the backward pass instead
    of holding its activations: the backward's memory falls to about one block's. Hooks inside a block run again
    in the recomputation, on tensors the backward never reaches, so what they collect is unchanged."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()  # modules already recomputed as part of a block
    for lst in model.modules():
        if isinstance(lst, nn.ModuleList) and id(lst) not in inside:
            blocks += lst
            inside.update(id(x) for m in lst for x in m.modules())
    for m in blocks:
        m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)
    try:
        yield
    finally:
        for m in blocks:
            del m.forward


def _add(acc: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in acc:
        acc[name] += value
    else:
        acc[name] = value.clone()


@torch.no_grad()
def reference_logprobs(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The float model's next-token log-probabilities on tokens [N, L], per pass (for plan_divergence)."""
    device = next(model.parameters()).device
    batch = _sequences_per_pass(tokens)
    return [F.log_softmax(model_logits(model, tokens[s:s + batch, :-1].to(device)).float(), dim=-1)
            for s in range(0, tokens.shape[0], batch)]


class Divergence(NamedTuple):
    kl: float  # KL(float || changed model), nats per token
    delta_loss: float  # the change of the cross-entropy of the tokens' own next tokens, nats per token


@torch.no_grad()
def plan_divergence(model: nn.Module, weights: dict[str, torch.Tensor], tokens: torch.Tensor,
                    reference: list[torch.Tensor]) -> Divergence:
    """How far the model with `weights` swapped in moves from the float model on the held-out tokens the
    reference log-probabilities were computed on. The parameters hold `weights` only during the passes (their
    own tensors are set aside untouched, not copied, and put back)."""
    params = dict(model.named_parameters())
    own = {name: params[name].data for name in weights}
    device = next(model.parameters()).device
    kl = dloss = 0.0
    count = 0
    try:
        for name, w in weights.items():
            params[name].data = w.to(own[name].device, own[name].dtype)
        batch = _sequences_per_pass(tokens)
        for i, start in enumerate(range(0, tokens.shape[0], batch)):
            seq = tokens[start:start + batch].to(device)
            lq = F.log_softmax(model_logits(model, seq[:, :-1]).float(), dim=-1)
            lp = reference[i]
            for p0 in range(0, lp.shape[1], _KL_POSITIONS):  # bounds the [positions, V] temporaries
                a, b = lp[:, p0:p0 + _KL_POSITIONS], lq[:, p0:p0 + _KL_POSITIONS]
                kl += float((a.exp() * (a - b)).sum(dtype=torch.float64))
            target = seq[:, 1:, None]
            dloss += float((lp.gather(-1, target) - lq.gather(-1, target)).sum(dtype=torch.float64))
            count += lp.shape[0] * lp.shape[1]
    finally:
        for name, t in own.items():
            params[name].data = t
    return Divergence(kl / count, dloss / count)
