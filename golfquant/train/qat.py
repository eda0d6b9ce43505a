"""Quantization-aware training: straight-through fake quantization of chosen roles' CastedLinear weights.

The forward pass sees `w + enabled * (q - w).detach()`, where q is golfquant's own RTN quantizer applied to w
(the row scales of `row_scales` with the clip `quantize` will use, the codes of `round_codes`), so training
adapts to exactly the grid the artifact stores; the gradient passes straight through to w.

q depends on the weights only, so it is computed once per optimizer step (`refresh_qat`), in eager mode,
into a buffer that the forward pass reads. That keeps it bit-identical to `quantize`: inside a compiled
graph, inductor drops the fp32 -> fp16 -> fp32 round trip of the scales as a no-op cast.

The switch is a tensor (`enabled`, 0.0 or 1.0), not a Python flag: torch.compile traces it as data, so one
compiled graph serves both phases. A Python attribute read at trace time is baked into the graph as a
constant (the 2026-03-21 record's late QAT was dead code for that reason).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from golfquant.errors import OptionError
from golfquant.model import CastedLinear
from golfquant.plan import ROLES, parse_scheme, role_of, scheme_bits
from golfquant.quant.clip import ClipSpec, parse_clip, round_codes, row_scales

# size searches a byte budget with data-dependent Python control flow and hsdclip needs calibration Hessians:
# neither can run inside every forward pass.
QAT_CLIP_METHODS = ("amax", "pct", "mse", "sdclip")


def parse_qat(text: str) -> dict[str, int]:
    """'mlp=int4,attn=int6' -> {'mlp': 4, 'attn': 6}; '' -> {} (QAT off)."""
    roles: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        role, sep, scheme = item.partition("=")
        role = role.strip()
        if not sep or role not in ROLES or role == "control":
            raise OptionError(f"--qat {text!r}: expected ROLE=intN pairs with ROLE one of mlp, attn, embed, other "
                              "(e.g. mlp=int4,attn=int6)")
        bits = scheme_bits(parse_scheme(scheme))
        if bits is None:
            raise OptionError(f"--qat {text!r}: {role}={scheme.strip()} is not an integer scheme; use int2..int8")
        if role in roles:
            raise OptionError(f"--qat {text!r}: role {role} given twice")
        roles[role] = bits
    return roles


def parse_qat_clip(text: str) -> ClipSpec:
    spec = parse_clip(text)
    if spec.method not in QAT_CLIP_METHODS:
        raise OptionError(f"--qat-clip {text!r}: QAT supports {', '.join(QAT_CLIP_METHODS)} clips, not "
                          f"{spec.method}; quantize with the same clip you train with")
    return spec


def fake_quantize(w: Tensor, bits: int, spec: ClipSpec, role: str) -> Tensor:
    """The weight as `quantize` (RTN) would store it: codes * fp16 row scales, in fp32, without gradient."""
    with torch.no_grad():
        scales = row_scales(w.detach(), bits, spec, role=role)
        return round_codes(w.detach(), scales, bits).float() * scales.float().unsqueeze(-1)


class FakeQuant(nn.Module):
    """A CastedLinear weight hook: straight-through fake quantization, on while `enabled` is 1.

    `quantized` holds q(w) as of the last `refresh`; both buffers are non-persistent (not in the state_dict).
    """

    def __init__(self, weight: Tensor, bits: int, spec: ClipSpec, role: str):
        super().__init__()
        self.bits, self.spec, self.role = bits, spec, role
        self.register_buffer("enabled", torch.zeros((), device=weight.device), persistent=False)
        self.register_buffer("quantized", torch.zeros_like(weight, dtype=torch.float32), persistent=False)

    def refresh(self, w: Tensor) -> None:
        self.quantized.copy_(fake_quantize(w, self.bits, self.spec, self.role))

    def forward(self, w: Tensor) -> Tensor:
        return w + self.enabled * (self.quantized - w.detach())


def _hooked(model: nn.Module) -> list[tuple[CastedLinear, FakeQuant]]:
    return [(m, m.weight_hook) for m in model.modules()
            if isinstance(m, CastedLinear) and isinstance(m.weight_hook, FakeQuant)]


def attach_qat(model: nn.Module, roles: dict[str, int], spec: ClipSpec) -> None:
    """Hook a (disabled) FakeQuant onto every CastedLinear whose weight has a role in `roles`."""
    covered = set()
    for name, module in model.named_modules():
        role = role_of(f"{name}.weight")
        if isinstance(module, CastedLinear) and role in roles:
            module.weight_hook = FakeQuant(module.weight, roles[role], spec, role)
            covered.add(role)
    missing = sorted(set(roles) - covered)
    if missing:
        raise OptionError(f"--qat names {', '.join(missing)} but no linear layer of the model has that role "
                          "(a tied embedding is not a linear layer); drop it from --qat")


def refresh_qat(model: nn.Module) -> None:
    """Recompute q(w) of every hook from the current weights (after each optimizer step while QAT is on)."""
    for module, hook in _hooked(model):
        hook.refresh(module.weight)


def set_qat(model: nn.Module, on: bool) -> None:
    """Switch every hook of the model on (with q(w) of the current weights) or off."""
    for module, hook in _hooked(model):
        hook.enabled.fill_(1.0 if on else 0.0)
        if on:
            hook.refresh(module.weight)


def detach_qat(model: nn.Module) -> None:
    """Remove the hooks: the model computes with its plain weights again."""
    for module, _ in _hooked(model):
        module.weight_hook = None
