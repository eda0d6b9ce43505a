"""Muon: momentum SGD whose matrix updates are orthogonalized by a Newton–Schulz iteration (the baseline's).

Distributed as the baseline is: the gradients are already averaged (DDP), every rank updates the momentum of
every matrix (cheap, and it keeps the optimizer state complete on each rank, so rank 0 alone can checkpoint
it), but orthogonalizes only the matrices `i % world_size == rank` into one flat buffer whose other entries
are zero; a SUM all-reduce of that buffer gives every rank every update. x + 0 is exact, so the result is
bit-identical to one process computing them all.
"""
from __future__ import annotations

import torch
from torch import Tensor

from golfquant import distributed

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalize a 2-D matrix (push its singular values towards 1), in bf16."""
    a, b, c = NS_COEFFS
    x = g.bfloat16()
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:  # iterate on the wide orientation: the Gram matrix x @ x.T is the smaller one
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def muon_momentum(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Momentum warmed linearly from `start` to `end` over `warmup_steps` steps."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int = 5, nesterov: bool = True,
                 env: distributed.DistEnv | None = None):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov))
        self.env = env if env is not None else distributed.DistEnv()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.bfloat16)
            offset = 0
            for i, p in enumerate(params):
                g = self._momentum_grad(p, group)
                if i % self.env.world_size == self.env.rank:
                    flat[offset : offset + p.numel()] = self._orthogonalize(g, group).reshape(-1)
                offset += p.numel()
            distributed.all_reduce_(flat)
            offset = 0
            for p in params:
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()
        return loss

    def _momentum_grad(self, p: Tensor, group: dict) -> Tensor:
        g = p.grad
        buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(g))
        buf.mul_(group["momentum"]).add_(g)
        return g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf

    @staticmethod
    def _orthogonalize(g: Tensor, group: dict) -> Tensor:
        update = zeropower_via_newtonschulz5(g, steps=group["backend_steps"])
        # Tall matrices get their RMS update scaled up as in the Muon reference implementations.
        return update * max(1.0, g.size(0) / g.size(1)) ** 0.5
