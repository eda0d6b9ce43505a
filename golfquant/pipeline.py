"""Quantize with a plan: checkpoint -> plan -> [calibration tokens -> Hessians] -> QuantizedTensors.

golfquant.api writes the artifact; golfquant.budget fits a byte budget; golfquant.roundtrip evaluates artifacts.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from golfquant.calib import (CalibConfig, Hessian, calibration_hessians, calibration_tokens,
                             capture_hessians_sequential, heldout_tokens)
from golfquant.checkpoint import Checkpoint
from golfquant.errors import OptionError
from golfquant.factory import build_model
from golfquant.plan import PlanOptions, TensorPlan, cast_to_scheme, make_plan
from golfquant.quant import QuantizedTensor
from golfquant.quant.clip import ClipSpec, hessian_weighted_error, parse_clip
from golfquant.quant.lqer import LqerOptions, apply_lqer, select_lqer_targets
from golfquant.quant.quantize import HESSIAN_CLIPS, METHODS, Quantizer


@dataclass
class QuantizeOptions:
    """What to quantize and how. With `budget` (decimal bytes of artifact + code) golfquant.budget chooses every
    free tensor's storage (fp16, or a width, clip and LQER correction) by measured damage; tensors of the roles in
    `fixed_roles` and tensors matched by a plan rule keep the plan's scheme; with `fixed_clip` the clip is the
    given one (only widths are free); with `fixed_float` the float-size convention (`plan.float_max_numel`) still
    keeps small tensors in fp16. With `prune_to_budget` the plan is kept as it is and the cheapest ±1 codes are
    zeroed until it fits."""

    plan: PlanOptions = field(default_factory=PlanOptions)
    method: str = "gptq"
    clip: str = "amax"
    calib: CalibConfig = field(default_factory=CalibConfig)
    block_size: int = 128
    act_order: bool = True
    damp: float = 0.01
    lqer: LqerOptions = field(default_factory=LqerOptions)
    num_heads: int | None = None
    model_spec: str | None = None
    model_args: dict | None = None
    budget: int | None = None
    prune_to_budget: bool = False
    fixed_roles: tuple[str, ...] = ()
    fixed_clip: bool = False
    fixed_float: bool = False
    exhaustive: bool = False  # compress every section with every codec x layout
    sequential: bool = False  # block i's Hessians collected with blocks 0..i-1 already quantized

    def validate(self) -> ClipSpec:
        if self.method not in METHODS:
            raise OptionError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.damp < 0 or self.block_size < 1:
            raise OptionError(f"damp must be >= 0 and block size >= 1, got {self.damp} and {self.block_size}")
        spec = parse_clip(self.clip)
        if self.prune_to_budget and self.budget is None:
            raise OptionError("--prune-to-budget needs --budget BYTES (e.g. --budget 16000000)")
        if self.budget is not None:
            if self.budget <= 0:
                raise OptionError(f"budget must be a positive number of bytes, got {self.budget}")
            if spec.method == "size":
                raise OptionError("--clip size and --budget both choose the size: drop one of them")
            if self.lqer.top > 0:
                raise OptionError("--lqer cannot be combined with --prune-to-budget: drop one of them"
                                  if self.prune_to_budget else
                                  "--budget buys LQER corrections per tensor where they pay: drop --lqer")
            if self.sequential:
                raise OptionError("--sequential cannot be combined with --budget yet: drop one of them")
        if self.sequential and self.method != "gptq":
            raise OptionError("--sequential quantizes block by block with GPTQ: add --method gptq")
        return spec

    @property
    def needs_hessians(self) -> bool:
        return (self.method == "gptq" or parse_clip(self.clip).method in HESSIAN_CLIPS or self.lqer.top > 0
                or (self.budget is not None and not self.prune_to_budget))

    @property
    def quantizer(self) -> Quantizer:
        return Quantizer(self.method, self.block_size, self.act_order, self.damp)


@dataclass
class TensorReport:
    """One row per quantized matrix, as it finishes."""

    name: str
    role: str
    scheme: str
    bits: int
    method: str
    seconds: float
    damp: float | None = None
    error_vs_rtn: float | None = None  # Hessian-weighted error relative to RTN at the same scales


@dataclass
class Calibration:
    """Hessians of every matrix (and the tied embedding) and what produced them; reusable across quantize calls
    on the same checkpoint (a sweep calibrates once). `heldout`: sequences the Hessians never saw, for measuring
    damage (budget runs only). `quantized` holds, after a sequential calibration, the tensors quantized while it
    ran."""

    hessians: dict[str, Hessian]
    info: dict  # goes into the artifact's manifest: no timings, so the same inputs give the same bytes
    quantized: dict[str, tuple[QuantizedTensor, TensorReport]] = field(default_factory=dict)
    heldout: torch.Tensor | None = None


@dataclass
class QuantizeResult:
    tensors: dict[str, QuantizedTensor | torch.Tensor]
    plan: dict[str, TensorPlan]
    reports: list[TensorReport]
    meta: dict


Progress = Callable[[str, int, int], None]  # (stage, done, total)


def quantize_state_dict(ckpt: Checkpoint, opts: QuantizeOptions, progress: Progress | None = None,
                        on_tensor: Callable[[TensorReport], None] | None = None,
                        calibration: Calibration | None = None) -> QuantizeResult:
    spec = opts.validate()
    sd = ckpt.state_dict
    plan = make_plan(sd, opts.plan)
    meta: dict = {"method": opts.method, "clip": str(spec)}
    calibration = _calibration_for(ckpt, opts, plan, meta, progress, calibration)
    hessians = calibration.hessians
    out: dict[str, QuantizedTensor | torch.Tensor] = {}
    reports: list[TensorReport] = []
    for name, tp in plan.items():
        if tp.bits is None:
            out[name] = cast_to_scheme(sd[name], tp.scheme)
            continue
        if name in calibration.quantized:
            out[name], report = calibration.quantized[name]
        else:
            out[name], report = quantize_tensor(sd[name], tp, tp.bits, spec, hessian_of(hessians, name), opts)
        reports.append(report)
        if on_tensor:
            on_tensor(report)
    gptq_meta(meta, reports, opts)
    if opts.lqer.top > 0:
        meta["lqer"] = _apply_lqer(out, sd, hessians, opts.lqer)
    return QuantizeResult(out, plan, reports, meta)


def _calibration_for(ckpt: Checkpoint, opts: QuantizeOptions, plan: dict[str, TensorPlan], meta: dict,
                     progress: Progress | None, given: Calibration | None) -> Calibration:
    if not (opts.needs_hessians and any(p.bits for p in plan.values())):
        return Calibration({}, {})
    calibration = given or calibrate(ckpt, opts, progress, plan)
    meta["calibration"] = calibration.info
    return calibration


def hessian_of(hessians: dict[str, Hessian], name: str) -> torch.Tensor | None:
    return hessians[name].H if name in hessians else None


def quantize_tensor(t: torch.Tensor, tp: TensorPlan, bits: int, spec: ClipSpec, h: torch.Tensor | None,
                    opts: QuantizeOptions, lqer: LqerOptions | None = None) -> tuple[QuantizedTensor, TensorReport]:
    """One matrix at `bits` with `spec` (opts.quantizer: GPTQ when asked and a Hessian exists, else RTN), and its
    report row."""
    start = time.perf_counter()
    qt, stats = opts.quantizer(t, bits, spec, tp.role, h, lqer)
    report = TensorReport(tp.name, tp.role, f"int{bits}", bits, "rtn", 0.0)
    if stats is not None:
        ratio = stats.hessian_error / stats.rtn_error if stats.rtn_error else 1.0
        report = TensorReport(tp.name, tp.role, f"int{bits}", bits, "gptq", 0.0, stats.damp_used, ratio)
    report.seconds = time.perf_counter() - start
    return qt, report


def gptq_meta(meta: dict, reports: list[TensorReport], opts: QuantizeOptions) -> None:
    damps = {r.name: r.damp for r in reports if r.damp is not None}
    if damps:
        meta["gptq"] = {"block_size": opts.block_size, "act_order": opts.act_order, "damp": damps}


def calibrate(ckpt: Checkpoint, opts: QuantizeOptions, progress: Progress | None = None,
              plan: dict[str, TensorPlan] | None = None, model: torch.nn.Module | None = None,
              heldout: bool = False) -> Calibration:
    """Calibration tokens from opts.calib, then the Hessians of every matrix: collected during generation when
    the model has a KV cache; with opts.sequential block by block, each block quantized (with the plan) before
    the next block's Hessians are collected. heldout=True also draws opts.calib.holdout tokens the Hessians never
    see. `model`: the float model of ckpt when the caller has built it already."""
    if model is None:
        model = build_float_model(ckpt, opts)
    held = heldout_tokens(model, opts.calib, stage(progress, "held-out tokens")) if heldout else None
    if not opts.sequential:
        tokens, hessians = calibration_hessians(model, opts.calib, progress=stage(progress, "calibration"))
        return Calibration(hessians, _calib_info(opts, tokens), heldout=held)
    plan = plan or make_plan(ckpt.state_dict, opts.plan)
    spec = opts.validate()
    tokens = calibration_tokens(model, opts.calib, stage(progress, "calibration tokens"))
    quantized: dict[str, tuple[QuantizedTensor, TensorReport]] = {}

    def quantize_fn(name: str, weight: torch.Tensor, hessian: Hessian) -> torch.Tensor:
        tp = plan.get(name)
        if tp is None or tp.bits is None:
            return weight
        quantized[name] = quantize_tensor(ckpt.state_dict[name], tp, tp.bits, spec, hessian.H, opts)
        return quantized[name][0].dequantize(weight.dtype)

    hessians = capture_hessians_sequential(model, tokens, quantize_fn, batch=opts.calib.batch,
                                           progress=stage(progress, "sequential hessians"))
    return Calibration(hessians, _calib_info(opts, tokens) | {"sequential": True}, quantized, held)


def build_float_model(ckpt: Checkpoint, opts: QuantizeOptions) -> torch.nn.Module:
    return build_model(ckpt.state_dict, ckpt.config, opts.model_spec, opts.num_heads, opts.model_args).eval()


def _calib_info(opts: QuantizeOptions, tokens: torch.Tensor) -> dict:
    return dataclasses.asdict(opts.calib) | {"tokens": int(tokens.numel())}


def stage(progress: Progress | None, name: str):
    """progress(name, done, total) as a two-argument callback (None stays None)."""
    return None if progress is None else (lambda done, total: progress(name, done, total))


def _apply_lqer(out: dict, sd: dict, hessians: dict[str, Hessian], lq: LqerOptions) -> dict:
    """Correct the `top` tensors with the largest Hessian-weighted (else weight-space) error with low-rank factors
    fitted with the activation scaling of their Hessians."""
    errors = {}
    for name, qt in out.items():
        if isinstance(qt, QuantizedTensor) and qt.codes.dim() == 2:
            errors[name] = hessian_weighted_error(sd[name].float(), qt.dequantize(), hessian_of(hessians, name))
    targets = select_lqer_targets(errors, lq.top)
    for name in targets:
        out[name] = apply_lqer(out[name], sd[name], lq.rank, lq.a_bits, lq.b_bits, lq.group,
                               hessian_of(hessians, name))
    return dataclasses.asdict(lq) | {"tensors": targets}
