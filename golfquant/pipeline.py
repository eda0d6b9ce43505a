"""Quantize with a plan: state_dict -> plan -> [calibration tokens -> Hessians] -> the values an artifact stores.

golfquant.api is the entry point and encodes the artifact; golfquant.budget fits a byte budget instead of taking
the plan as given; golfquant.roundtrip evaluates artifacts.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from golfquant.calib import (Hessian, calibration_hessians, calibration_tokens, capture_hessians_sequential,
                             heldout_tokens, resolve_batch)
from golfquant.checkpoint import Checkpoint
from golfquant.distributed import collective, my_items, resolve_device
from golfquant.factory import build_model
from golfquant.options import QuantizeOptions
from golfquant.plan import TensorPlan, cast_to_scheme, make_plan
from golfquant.quant import QuantizedTensor
from golfquant.quant.clip import ClipSpec, hessian_weighted_error
from golfquant.quant.gptq import PreparedHessian
from golfquant.quant.lqer import LqerOptions, apply_lqer, select_lqer_targets
from golfquant.quant.qtensor import Rotation
from golfquant.quant.quantize import Setting
from golfquant.quant.salient import SalientOptions


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
class Quantized:
    """The values an artifact stores (QuantizedTensors, float tensors as stored), their plan, the per-tensor
    reports and the manifest's meta."""

    tensors: dict[str, QuantizedTensor | torch.Tensor]
    plan: dict[str, TensorPlan]
    reports: list[TensorReport]
    meta: dict


Progress = Callable[[str, int, int], None]  # (stage name, done, total); calib.StageProgress is (done, total)


def quantize_with_plan(ckpt: Checkpoint, opts: QuantizeOptions, progress: Progress | None = None,
                       on_tensor: Callable[[TensorReport], None] | None = None,
                       calibration: Calibration | None = None, model: torch.nn.Module | None = None) -> Quantized:
    """Every tensor as opts.plan says. `model`: the float model of ckpt when the caller holds it (it calibrates on
    its own device); else it is built from the checkpoint when calibration needs one."""
    spec = opts.clip
    sd = ckpt.state_dict
    plan = make_plan(sd, opts.plan)
    meta: dict = {"method": opts.method, "clip": str(spec)}
    rotations = {n: opts.rotation_for(n, tp.shape) for n, tp in plan.items() if tp.bits is not None}  # refused early
    if any(rotations.values()):
        meta["rotate"] = opts.rotate
    calibration = _calibration_for(ckpt, opts, plan, meta, progress, calibration, model)
    hessians = calibration.hessians
    todo = [n for n, tp in plan.items() if tp.bits is not None and n not in calibration.quantized]

    def my_share() -> dict[str, tuple[QuantizedTensor, TensorReport]]:
        # Under torchrun each process quantizes a share of the tensors, the largest first; all get every result.
        mine = my_items(todo, [sd[n].numel() for n in todo])
        done = {}
        for i, name in enumerate(mine, 1):
            h = hessian_of(hessians, name)
            done[name] = quantize_tensor(sd[name], plan[name], plan[name].bits, spec, h, opts,
                                         salient=salient_for(opts, sd[name], plan[name].bits, h),
                                         rotation=rotations[name])
            if progress is not None:
                progress("quantize", i, len(mine))
        return done

    results = calibration.quantized | {k: v for part in collective(my_share) for k, v in part.items()}
    out: dict[str, QuantizedTensor | torch.Tensor] = {}
    reports: list[TensorReport] = []
    for name, tp in plan.items():
        if tp.bits is None:
            out[name] = cast_to_scheme(sd[name], tp.scheme)
            continue
        out[name], report = results[name]
        reports.append(report)
        if on_tensor:
            on_tensor(report)
    gptq_meta(meta, reports, opts)
    clip_k_meta(meta, spec, plan.values())
    if opts.salient.top > 0:
        meta["salient"] = dataclasses.asdict(opts.salient) | {
            "tensors": [n for n, v in out.items() if isinstance(v, QuantizedTensor) and v.salient is not None]}
    if opts.lqer.top > 0:
        meta["lqer"] = _apply_lqer(out, sd, hessians, opts.lqer)
    return Quantized(out, plan, reports, meta)


def _calibration_for(ckpt: Checkpoint, opts: QuantizeOptions, plan: dict[str, TensorPlan], meta: dict,
                     progress: Progress | None, given: Calibration | None,
                     model: torch.nn.Module | None) -> Calibration:
    if not (opts.needs_hessians and any(p.bits for p in plan.values())):
        return Calibration({}, {})
    calibration = given or calibrate(ckpt, opts, progress, plan, model)
    meta["calibration"] = calibration.info
    return calibration


def hessian_of(hessians: dict[str, Hessian], name: str) -> torch.Tensor | None:
    return hessians[name].H if name in hessians else None


def salient_for(opts: QuantizeOptions, t: torch.Tensor, bits: int, h: torch.Tensor | None) -> SalientOptions | None:
    """opts.salient where the tensor can have it (a Hessian, columns in whole groups, a wider salient width), else
    None: --salient applies to every matrix that fits and leaves the others as they are (meta["salient"] names
    those it applied to)."""
    s = opts.salient
    return s if s.top > 0 and not s.auto and s.unfit(tuple(t.shape), bits, h) is None else None


def quantize_tensor(t: torch.Tensor, tp: TensorPlan, bits: int, spec: ClipSpec, h: torch.Tensor | None,
                    opts: QuantizeOptions, lqer: LqerOptions | None = None, salient: SalientOptions | None = None,
                    rotation: Rotation | None = None, prepared: list[PreparedHessian] | None = None
                    ) -> tuple[QuantizedTensor, TensorReport]:
    """One matrix at `bits` with `spec` (opts.quantizer: GPTQ when asked and a Hessian exists, else RTN), optionally
    with salient column groups and in a rotated basis, and its report row. `prepared`: opts.quantizer.prepare(h,
    rotation), when the caller has it."""
    return quantize_tensor_many(t, tp, [Setting(bits, spec, lqer, salient)], h, opts, rotation, prepared)[0]


def quantize_tensor_many(t: torch.Tensor, tp: TensorPlan, settings: list[Setting], h: torch.Tensor | None,
                         opts: QuantizeOptions, rotation: Rotation | None = None,
                         prepared: list[PreparedHessian] | None = None) -> list[tuple[QuantizedTensor, TensorReport]]:
    """quantize_tensor at each setting, with GPTQ's sweeps shared (Quantizer.many); the time is split evenly."""
    start = time.perf_counter()
    got = opts.quantizer.many(t, settings, tp.role, h, prepared, rotation=rotation)
    seconds = (time.perf_counter() - start) / len(settings)
    out = []
    for st, (qt, stats) in zip(settings, got):
        report = TensorReport(tp.name, tp.role, f"int{st.bits}", st.bits, "rtn", seconds)
        if stats is not None:
            ratio = stats.hessian_error / stats.rtn_error if stats.rtn_error else 1.0
            report = TensorReport(tp.name, tp.role, f"int{st.bits}", st.bits, "gptq", seconds, stats.damp_used, ratio)
        out.append((qt, report))
    return out


def gptq_meta(meta: dict, reports: list[TensorReport], opts: QuantizeOptions) -> None:
    damps = {r.name: r.damp for r in reports if r.damp is not None}
    if damps:
        meta["gptq"] = {"block_size": opts.block_size, "act_order": opts.act_order, "damp": damps}


def clip_k_meta(meta: dict, spec: ClipSpec, plans: Iterable[TensorPlan]) -> None:
    """The SDClip k each role's quantized tensors got, by width, as the clip resolved it (bare `sdclip` takes the
    records' k for the role and width): meta["clip_k"] = {role: {bits: k}}."""
    ks: dict[str, dict[str, float]] = {}
    for tp in plans:
        if tp.bits is not None and spec.k_by_role(tp.bits):
            ks.setdefault(tp.role, {})[str(tp.bits)] = spec.k_for(tp.role, tp.bits)
    if ks:
        meta["clip_k"] = ks


def calibrate(ckpt: Checkpoint, opts: QuantizeOptions, progress: Progress | None = None,
              plan: dict[str, TensorPlan] | None = None, model: torch.nn.Module | None = None,
              heldout: bool = False) -> Calibration:
    """Calibration tokens from opts.calib, then the Hessians of every matrix: collected during generation when
    the model has a KV cache; with opts.sequential block by block, each block quantized (with the plan) before
    the next block's Hessians are collected. heldout=True also draws opts.calib.holdout tokens the Hessians never
    see. `model`: the float model of ckpt when the caller holds it already; it runs on its own device (a
    sequential calibration overwrites its weights)."""
    if model is None:
        model = build_float_model(ckpt, opts)
    held = heldout_tokens(model, opts.calib, stage(progress, "held-out tokens")) if heldout else None
    if held is not None:
        held = held.cpu()
    if not opts.sequential:
        tokens, hessians = calibration_hessians(model, opts.calib, progress=stage(progress, "calibration"))
        return Calibration(_on_cpu(hessians), _calib_info(opts, model, tokens), heldout=held)
    plan = plan or make_plan(ckpt.state_dict, opts.plan)
    spec = opts.clip
    tokens = calibration_tokens(model, opts.calib, stage(progress, "calibration tokens"))
    quantized: dict[str, tuple[QuantizedTensor, TensorReport]] = {}

    def quantize_fn(name: str, weight: torch.Tensor, hessian: Hessian) -> torch.Tensor:
        tp = plan.get(name)
        if tp is None or tp.bits is None:
            return weight
        w = ckpt.state_dict[name]
        quantized[name] = quantize_tensor(w, tp, tp.bits, spec, hessian.H, opts,
                                          salient=salient_for(opts, w, tp.bits, hessian.H),
                                          rotation=opts.rotation_for(name, tp.shape))
        return quantized[name][0].dequantize(weight.dtype)

    hessians = capture_hessians_sequential(model, tokens, quantize_fn, batch=resolve_batch(model, opts.calib),
                                           progress=stage(progress, "sequential hessians"))
    return Calibration(_on_cpu(hessians), _calib_info(opts, model, tokens) | {"sequential": True}, quantized, held)


def _on_cpu(hessians: dict[str, Hessian]) -> dict[str, Hessian]:
    """Hessians collected on the model's device, moved to the CPU where quantization runs (in place: the Hessian
    objects that several weights share stay shared)."""
    for h in {id(h): h for h in hessians.values()}.values():
        h.H = h.H.cpu()
    return hessians


def build_float_model(ckpt: Checkpoint, opts: QuantizeOptions, share: bool = False) -> torch.nn.Module:
    """The float model of ckpt on opts.device, in eval mode (`share`: model.load_weights)."""
    model = build_model(ckpt.state_dict, ckpt.config, opts.model_spec, opts.num_heads, opts.model_args, share)
    return model.to(resolve_device(opts.device)).eval()


def _calib_info(opts: QuantizeOptions, model: torch.nn.Module, tokens: torch.Tensor) -> dict:
    """The calibration as run (the batch as resolved: it is part of what the tokens depend on)."""
    return dataclasses.asdict(opts.calib) | {"batch": resolve_batch(model, opts.calib), "tokens": int(tokens.numel())}


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
