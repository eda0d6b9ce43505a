"""Quantization plan: a role and a storage scheme for every tensor of a state_dict.

Roles come from the challenge's naming conventions; schemes from role flags (--mlp/--attn/--embed/--other) and
`--rule REGEX=SCHEME` overrides (first matching rule wins; rules beat role flags and the passthrough defaults).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from golfquant.errors import OptionError
from golfquant.quant.qtensor import MAX_BITS, MIN_BITS

ROLES = ("control", "embed", "attn", "mlp", "other")

# The challenge's CONTROL_TENSOR_NAME_PATTERNS (baseline list plus the later records' additions); substring match.
CONTROL_TENSOR_NAME_PATTERNS = (
    "attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
    "skip_weight", "skip_weights", "skip_gates", "parallel_post_lambdas", "parallel_resid_lambdas",
    "attn_gate_proj", "attn_gate_w", "smear_gate", "smear_lambda",
)
# Checked in this order after the control patterns; substring match on the full name.
_ROLE_PATTERNS = (
    ("embed", ("tok_emb", "lm_head", "bigram.embed", "ve_shared.embed", "embed_tokens", "value_embed")),
    ("mlp", ("mlp.fc", "mlp.proj", "mlp_up_bank", "mlp_down_bank", ".mlp.")),
    ("attn", ("c_q", "c_k", "c_v", "attn.proj", "qo_bank", "kv_bank", ".attn.")),
)

INT_SCHEMES = tuple(f"int{b}" for b in range(MIN_BITS, MAX_BITS + 1))
FLOAT_SCHEMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def cast_to_scheme(t: torch.Tensor, scheme: str) -> torch.Tensor:
    """A passthrough tensor as stored: float schemes cast, everything else as it is."""
    return t.to(FLOAT_SCHEMES[scheme]) if scheme in FLOAT_SCHEMES else t


def scheme_of_dtype(dtype: torch.dtype) -> str:
    return {d: s for s, d in FLOAT_SCHEMES.items()}.get(dtype, "raw")


# "raw" is never chosen by the user: non-float tensors (int buffers, masks) are stored as they are.
SCHEMES = INT_SCHEMES + tuple(FLOAT_SCHEMES) + ("raw",)

# dtypes an artifact may hold (original and stored); the names are what the manifest records.
DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise OptionError(f"unsupported tensor dtype {dtype}: use one of {', '.join(DTYPES)}")
    return _DTYPE_NAMES[dtype]


def is_control_tensor(name: str) -> bool:
    """Control tensors (gains, mixes, skip weights) train in the scalar Adam group and stay fp32 in artifacts."""
    return any(p in name for p in CONTROL_TENSOR_NAME_PATTERNS)


def role_of(name: str) -> str:
    """The role of a state_dict key, from the challenge's naming conventions."""
    if is_control_tensor(name):
        return "control"
    for role, patterns in _ROLE_PATTERNS:
        if any(p in name for p in patterns):
            return role
    return "other"


def parse_scheme(text: str) -> str:
    scheme = text.strip().lower()
    if scheme not in SCHEMES or scheme == "raw":
        raise OptionError(f"unknown scheme '{text}': use int2..int8, fp16, bf16 or fp32")
    return scheme


def scheme_bits(scheme: str) -> int | None:
    return int(scheme[3:]) if scheme in INT_SCHEMES else None


def parse_rule(text: str) -> tuple[str, str]:
    """'REGEX=SCHEME' -> (regex, scheme); split at the last '=' so the regex may contain one."""
    regex, sep, scheme = text.rpartition("=")
    if not sep or not regex:
        raise OptionError(f"bad rule '{text}': write it as REGEX=SCHEME, e.g. 'blocks\\.8\\.attn\\.c_k=fp16'")
    _compile(regex)
    return regex, parse_scheme(scheme)


def _compile(regex: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as e:
        raise OptionError(f"bad rule regex '{regex}': {e}") from None


@dataclass(frozen=True)
class PlanOptions:
    mlp: str = "int8"
    attn: str = "int8"
    embed: str = "int8"
    other: str = "int8"
    rules: tuple[tuple[str, str], ...] = ()  # (regex, scheme), searched with re.search; a list is accepted
    float_max_numel: int = 65536  # float tensors this small stay fp16 (the challenge's convention)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(tuple(r) for r in self.rules))


@dataclass(frozen=True)
class TensorPlan:
    name: str
    role: str
    scheme: str
    bits: int | None
    shape: tuple[int, ...]
    dtype: str  # original dtype name (a key of DTYPES)


def make_plan(state_dict: Mapping[str, torch.Tensor], options: PlanOptions) -> dict[str, TensorPlan]:
    role_schemes = {r: parse_scheme(getattr(options, r)) for r in ("mlp", "attn", "embed", "other")}
    rules = [(regex, _compile(regex), parse_scheme(s)) for regex, s in options.rules]
    if options.float_max_numel < 0:
        raise OptionError(f"float_max_numel must be >= 0, got {options.float_max_numel}")
    used: set[str] = set()
    plan = {}
    for name, t in state_dict.items():
        role = role_of(name)
        if not t.is_floating_point():
            scheme = "raw"
        else:
            matching = [(regex, s) for regex, pattern, s in rules if pattern.search(name)]
            used.update(regex for regex, _ in matching)
            if matching:
                scheme = matching[0][1]
            else:
                scheme = _default_scheme(t, role, role_schemes, options.float_max_numel)
        if scheme in INT_SCHEMES and t.dim() not in (2, 3):
            raise OptionError(f"cannot quantize '{name}' of shape {list(t.shape)} to {scheme}: only matrices and "
                              "3-D parameter banks are quantized; give it fp16, bf16 or fp32")
        plan[name] = TensorPlan(name, role, scheme, scheme_bits(scheme), tuple(t.shape), dtype_name(t.dtype))
    unused = [regex for regex, _, _ in rules if regex not in used]
    if unused:
        raise OptionError(f"rule regex '{unused[0]}' matches no float tensor of the checkpoint: fix or drop the rule")
    return plan


def _default_scheme(t: torch.Tensor, role: str, role_schemes: dict[str, str], float_max_numel: int) -> str:
    if role == "control":
        return "fp32"
    if t.numel() <= float_max_numel:
        return "fp16"
    if t.dim() in (2, 3):  # 3-D parameter banks [S, R, C] are stacks of matrices, quantized per row of each slice
        return role_schemes[role]
    return "fp16"
