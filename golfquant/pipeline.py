"""The two directions of the pipeline, as library calls the CLI stays thin over.

quantize:  checkpoint -> plan -> [calibration tokens -> Hessians] -> QuantizedTensors -> artifact file
roundtrip: artifact -> dequantized state_dict -> model -> val_bpb, beside the float checkpoint's val_bpb
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from golfquant.artifact import ArtifactInfo, PackedTensor, load_artifact, read_artifact, write_artifact
from golfquant.calib import (CalibConfig, Hessian, calibration_hessians, calibration_tokens,
                             capture_hessians_sequential, vocab_size)
from golfquant.codec.sizemodel import ScaledEntropyPricer
from golfquant.codepack import code_size
from golfquant.checkpoint import Checkpoint, load_checkpoint
from golfquant.data import ByteLUTs, build_byte_luts, check_tokenizer_fits, check_tokens_fit, load_tokens
from golfquant.errors import OptionError
from golfquant.evaluate import EvalResult, eval_val_bpb
from golfquant.factory import build_model
from golfquant.plan import PlanOptions, TensorPlan, cast_to_scheme, make_plan
from golfquant.quant import QuantizedTensor
from golfquant.quant.allocate import WIDTHS, allocate, measure_candidates, sdclip_candidates
from golfquant.quant.clip import ClipSpec, entropy_bits, hessian_weighted_error, parse_clip, round_codes, row_scales
from golfquant.quant.gptq import gptq_quantize
from golfquant.quant.lqer import apply_lqer, select_lqer_targets
from golfquant.quant.prune import prune_costs, prune_to_bytes, pruned_floor

METHODS = ("rtn", "gptq")
# Clip methods that read the tensor's Hessian; tensors without one fall back to plain k·std clipping.
_HESSIAN_CLIPS = ("hsdclip",)
BUDGET_TOLERANCE = 0.005  # with --budget the total lands in [(1 - this)·B, B] when B is reachable
_ALLOCATION_ROUNDS = 5  # allocate -> quantize -> compress rounds, each correcting the size estimates
_PRUNE_ROUNDS = 4  # prune -> compress confirmations


@dataclass(frozen=True)
class LqerOptions:
    top: int = 0  # number of tensors corrected; 0 = off
    rank: int = 4
    a_bits: int = 2
    b_bits: int = 4
    group: int = 64


@dataclass
class QuantizeOptions:
    """What to quantize and how. With `budget` (decimal bytes of artifact + code) the widths and SDClip k of the
    tensors are allocated to fit it (golfquant.quant.allocate), except the roles in `fixed_roles`, tensors matched
    by a plan rule (they keep the plan's scheme) and, with `fixed_clip`, the clip (then only widths are free);
    with `prune_to_budget` the plan is kept as it is and the cheapest ±1 codes are zeroed until it fits."""

    plan: PlanOptions = field(default_factory=PlanOptions)
    method: str = "rtn"
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
                raise OptionError("--lqer cannot be combined with --budget yet: drop one of them")
            if self.sequential:
                raise OptionError("--sequential cannot be combined with --budget yet: drop one of them")
        if self.sequential and self.method != "gptq":
            raise OptionError("--sequential quantizes block by block with GPTQ: add --method gptq")
        return spec

    @property
    def needs_hessians(self) -> bool:
        return (self.method == "gptq" or parse_clip(self.clip).method in _HESSIAN_CLIPS or self.lqer.top > 0
                or self.budget is not None)


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
    on the same checkpoint (a sweep calibrates once). `quantized` holds, after a sequential calibration, the
    tensors quantized while it ran."""

    hessians: dict[str, Hessian]
    info: dict  # goes into the artifact's manifest: no timings, so the same inputs give the same bytes
    quantized: dict[str, tuple[QuantizedTensor, TensorReport]] = field(default_factory=dict)


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
            out[name], report = _quantize_one(sd[name], tp, tp.bits, spec, _h(hessians, name), opts)
        reports.append(report)
        if on_tensor:
            on_tensor(report)
    _gptq_meta(meta, reports, opts)
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


def _h(hessians: dict[str, Hessian], name: str) -> torch.Tensor | None:
    return hessians[name].H if name in hessians else None


def _quantize_one(t: torch.Tensor, tp: TensorPlan, bits: int, spec: ClipSpec, h: torch.Tensor | None,
                  opts: QuantizeOptions) -> tuple[QuantizedTensor, TensorReport]:
    """One matrix at `bits` with `spec`: GPTQ when asked and a Hessian exists, else RTN."""
    start = time.perf_counter()
    scales = row_scales(t.float(), bits, _clip_for(spec, h), h, tp.role)
    scheme = f"int{bits}"
    if opts.method == "gptq" and h is not None:
        qt, stats = gptq_quantize(t.float(), h, bits, scales, opts.block_size, opts.act_order, opts.damp)
        ratio = stats.hessian_error / stats.rtn_error if stats.rtn_error > 0 else 1.0
        report = TensorReport(tp.name, tp.role, scheme, bits, "gptq", 0.0, stats.damp_used, ratio)
    else:
        qt = QuantizedTensor(round_codes(t.float(), scales, bits), scales, bits)
        report = TensorReport(tp.name, tp.role, scheme, bits, "rtn", 0.0)
    report.seconds = time.perf_counter() - start
    return qt, report


def _gptq_meta(meta: dict, reports: list[TensorReport], opts: QuantizeOptions) -> None:
    damps = {r.name: r.damp for r in reports if r.damp is not None}
    if damps:
        meta["gptq"] = {"block_size": opts.block_size, "act_order": opts.act_order, "damp": damps}


def _clip_for(spec: ClipSpec, hessian: torch.Tensor | None) -> ClipSpec:
    if spec.method in _HESSIAN_CLIPS and hessian is None:
        return dataclasses.replace(spec, method="sdclip", lam=0.0)
    return spec


def calibrate(ckpt: Checkpoint, opts: QuantizeOptions, progress: Progress | None = None,
              plan: dict[str, TensorPlan] | None = None) -> Calibration:
    """Calibration tokens from opts.calib, then the Hessians of every matrix: collected during generation when
    the model has a KV cache; with opts.sequential block by block, each block quantized (with the plan) before
    the next block's Hessians are collected."""
    model = build_model(ckpt.state_dict, ckpt.config, opts.model_spec, opts.num_heads, opts.model_args).eval()
    if not opts.sequential:
        tokens, hessians = calibration_hessians(model, opts.calib, progress=_stage(progress, "calibration"))
        return Calibration(hessians, _calib_info(opts, tokens))
    plan = plan or make_plan(ckpt.state_dict, opts.plan)
    spec = opts.validate()
    tokens = calibration_tokens(model, opts.calib, _stage(progress, "calibration tokens"))
    quantized: dict[str, tuple[QuantizedTensor, TensorReport]] = {}

    def quantize_fn(name: str, weight: torch.Tensor, hessian: Hessian) -> torch.Tensor:
        tp = plan.get(name)
        if tp is None or tp.bits is None:
            return weight
        quantized[name] = _quantize_one(ckpt.state_dict[name], tp, tp.bits, spec, hessian.H, opts)
        return quantized[name][0].dequantize(weight.dtype)

    hessians = capture_hessians_sequential(model, tokens, quantize_fn, batch=opts.calib.batch,
                                           progress=_stage(progress, "sequential hessians"))
    return Calibration(hessians, _calib_info(opts, tokens) | {"sequential": True}, quantized)


def _calib_info(opts: QuantizeOptions, tokens: torch.Tensor) -> dict:
    return dataclasses.asdict(opts.calib) | {"tokens": int(tokens.numel())}


def _stage(progress: Progress | None, stage: str):
    return None if progress is None else (lambda done, total: progress(stage, done, total))


def _apply_lqer(out: dict, sd: dict, hessians: dict[str, Hessian], lq: LqerOptions) -> dict:
    """Correct the `top` tensors with the largest Hessian-weighted (else weight-space) error with low-rank factors."""
    errors = {}
    for name, qt in out.items():
        if isinstance(qt, QuantizedTensor) and qt.codes.dim() == 2:
            h = hessians[name].H if name in hessians else None
            errors[name] = hessian_weighted_error(sd[name].float(), qt.dequantize(), h)
    targets = select_lqer_targets(errors, lq.top)
    for name in targets:
        out[name] = apply_lqer(out[name], sd[name], lq.rank, lq.a_bits, lq.b_bits, lq.group)
    return dataclasses.asdict(lq) | {"tensors": targets}


def quantize_checkpoint(ckpt_path, out_path, opts: QuantizeOptions, code_path=None, packed_code: bool = False,
                        progress: Progress | None = None, on_tensor=None, calibration: Calibration | None = None
                        ) -> dict:
    """Quantize a checkpoint file into an artifact file; returns a summary (the CLI's JSON)."""
    ckpt = load_checkpoint(ckpt_path)
    code_bytes = 0 if code_path is None else code_size(code_path, packed=packed_code)
    extra = {"checkpoint": Path(ckpt_path).name, "model_config": ckpt.config}
    budget_summary: dict = {}
    if opts.budget is None:
        result = quantize_state_dict(ckpt, opts, progress, on_tensor, calibration)
        artifact_bytes = write_artifact(out_path, result.tensors, result.plan, result.meta | extra,
                                        exhaustive=opts.exhaustive).total_bytes
    else:
        result, info, budget_summary = quantize_to_budget(ckpt, opts, out_path, code_bytes, extra, progress,
                                                          on_tensor, calibration)
        artifact_bytes = info.total_bytes
    return {
        "artifact": str(out_path),
        "artifact_bytes": artifact_bytes,
        "code_bytes": code_bytes,
        "total_bytes": artifact_bytes + code_bytes,
        "tensors": [{"name": tp.name, "role": tp.role, "scheme": tp.scheme, "bits": tp.bits}
                    for tp in result.plan.values()],
        "reports": [dataclasses.asdict(r) for r in result.reports],
        "meta": result.meta,
    } | budget_summary


@dataclass
class _BudgetRun:
    """Shared state of a budgeted quantization: writes the artifact and keeps the last size report."""

    sd: dict
    plan: dict[str, TensorPlan]
    hessians: dict[str, Hessian]
    h_default: float
    opts: QuantizeOptions
    out_path: Path
    meta: dict  # the artifact's meta (and the summary's), updated as quantization goes
    extra_meta: dict  # the artifact's only
    reports: list[TensorReport]
    budget: int  # artifact bytes allowed (the budget minus the code bytes)

    def write(self, tensors: dict, plan: dict[str, TensorPlan]) -> ArtifactInfo:
        _gptq_meta(self.meta, self.reports, self.opts)
        return write_artifact(self.out_path, tensors, plan, self.meta | self.extra_meta,
                              exhaustive=self.opts.exhaustive)

    def h_diag(self, name: str) -> torch.Tensor | None:
        h = _h(self.hessians, name)
        return None if h is None else torch.diagonal(h, dim1=-2, dim2=-1)


def quantize_to_budget(ckpt: Checkpoint, opts: QuantizeOptions, out_path, code_bytes: int, extra_meta: dict,
                       progress: Progress | None = None, on_tensor: Callable[[TensorReport], None] | None = None,
                       calibration: Calibration | None = None) -> tuple[QuantizeResult, ArtifactInfo, dict]:
    """Write an artifact with artifact + code bytes <= opts.budget, and within BUDGET_TOLERANCE of it when the
    widths can reach it: allocation (widths x SDClip k per free tensor, golfquant.quant.allocate), or with
    opts.prune_to_budget the plan as given plus selective ±1 pruning. Every size is confirmed by compressing.
    Returns (result, size report of the written file, summary fields for the CLI)."""
    spec = opts.validate()
    sd = ckpt.state_dict
    plan = make_plan(sd, opts.plan)
    meta: dict = {"method": opts.method, "clip": str(spec), "budget": opts.budget}
    hessians = _calibration_for(ckpt, opts, plan, meta, progress, calibration).hessians
    means = sorted(float(torch.diagonal(h.H, dim1=-2, dim2=-1).mean()) for h in hessians.values())
    h_default = means[len(means) // 2] if means else 1.0
    meta["pruned_codes"] = 0
    reports: list[TensorReport] = []
    run = _BudgetRun(sd, plan, hessians, h_default, opts, Path(out_path), meta, extra_meta, reports,
                     opts.budget - code_bytes)
    if run.budget <= 0:
        raise OptionError(f"budget {opts.budget:,} bytes is used up by the {code_bytes:,} code bytes alone")
    tensors = {n: cast_to_scheme(sd[n], tp.scheme) for n, tp in plan.items() if tp.bits is None}

    def report(r: TensorReport) -> None:
        reports.append(r)
        if on_tensor:
            on_tensor(r)

    if opts.prune_to_budget:
        for name, tp in plan.items():
            if tp.bits is not None:
                tensors[name], r = _quantize_one(sd[name], tp, tp.bits, spec, _h(hessians, name), opts)
                report(r)
        info = run.write(tensors, plan)
        summary: dict = {"allocation": None}
    else:
        tensors, plan, info, summary = _allocate_rounds(run, spec, tensors, report)
    if info.total_bytes > run.budget:
        tensors, info = _prune_to_fit(run, tensors, plan, info, [n for n, tp in plan.items() if tp.bits], code_bytes)
    summary |= {"budget": opts.budget, "pruned_codes": meta["pruned_codes"],
                "budget_used": (info.total_bytes + code_bytes) / opts.budget}
    return QuantizeResult(tensors, plan, reports, meta), info, summary


def _allocate_rounds(run: _BudgetRun, spec: ClipSpec, tensors: dict, report: Callable[[TensorReport], None]
                     ) -> tuple[dict, dict[str, TensorPlan], ArtifactInfo, dict]:
    """Allocate, quantize the chosen candidates, compress; correct each tensor's size estimate by its real
    compressed bytes and re-allocate until the artifact lands in [(1 - tolerance)·budget, budget] or above it
    (then the caller prunes it down). When the allocation leaves room that no single hull step fits, the next
    round aims above the budget by that room, so pruning, which is fine-grained, spends it."""
    opts, sd, budget = run.opts, run.sd, run.budget
    rules = [re.compile(regex) for regex, _ in opts.plan.rules]
    quantized = [n for n, tp in run.plan.items() if tp.bits is not None]
    free = [n for n in quantized if run.plan[n].role not in opts.fixed_roles and not any(p.search(n) for p in rules)]
    for name in quantized:
        if name not in free:
            tp = run.plan[name]
            tensors[name], r = _quantize_one(sd[name], tp, tp.bits, spec, _h(run.hessians, name), opts)
            report(r)
    options = [(b, spec) for b in WIDTHS] if opts.fixed_clip else sdclip_candidates()
    cands = {n: measure_candidates(sd[n], _h(run.hessians, n), run.h_default, run.plan[n].role, options,
                                   _entropy_bytes) for n in free}
    scale = {n: 1.0 for n in free}
    overhead = _overhead_guess(sd, run.plan, tensors, free)
    aim, cache = float(budget), {}
    plan: dict[str, TensorPlan] = dict(run.plan)
    for rounds in range(1, _ALLOCATION_ROUNDS + 1):
        choice = allocate(cands, aim - overhead, scale)
        smallest = choice is None
        if smallest:
            choice = {n: min(range(len(cs)), key=lambda i, cs=cs: (cs[i].bytes, i)) for n, cs in cands.items()}
        estimate = overhead + sum(cands[n][i].bytes * scale[n] for n, i in choice.items())
        for name, i in choice.items():
            c = cands[name][i]
            plan[name] = dataclasses.replace(run.plan[name], scheme=f"int{c.bits}", bits=c.bits)
            if (name, i) not in cache:
                cache[(name, i)] = _quantize_one(sd[name], plan[name], c.bits, c.clip, _h(run.hessians, name), opts)
                report(cache[(name, i)][1])
            tensors[name] = cache[(name, i)][0]
        info = run.write(tensors, plan)
        real_codes = {t.name: t.codes_bytes for t in info.tensors}
        for name, i in choice.items():
            scale[name] = real_codes[name] / max(cands[name][i].bytes, 1.0)
        overhead = info.total_bytes - sum(real_codes[n] for n in free)
        if smallest and info.total_bytes > budget:
            Path(run.out_path).unlink(missing_ok=True)
            code = opts.budget - budget
            raise OptionError(f"budget {opts.budget:,} bytes cannot be met: the smallest reachable artifact is "
                              f"{info.total_bytes:,} bytes + {code:,} code bytes; raise the budget, or free the "
                              "widths fixed by --mlp/--attn/--embed/--other/--rule")
        least_error = all(cands[n][i].error <= min(c.error for c in cands[n]) for n, i in choice.items())
        if info.total_bytes > budget or info.total_bytes >= (1 - BUDGET_TOLERANCE) * budget or least_error:
            break
        if abs(info.total_bytes - estimate) <= BUDGET_TOLERANCE / 2 * budget:  # estimates fine, steps too coarse
            aim += (1 - BUDGET_TOLERANCE / 2) * budget - info.total_bytes
    allocation = [{"name": n, "bits": plan[n].bits, "clip": str(cands[n][choice[n]].clip) if n in free else str(spec),
                   "free": n in free} for n in quantized]
    return tensors, plan, info, {"allocation": allocation, "allocation_rounds": rounds}


def _entropy_bytes(codes: torch.Tensor, bits: int) -> float:
    return entropy_bits(codes) * codes.numel() / 8


def _overhead_guess(sd: dict, plan: dict[str, TensorPlan], tensors: dict, free: list[str]) -> float:
    """Bytes other than the free tensors' codes before anything is compressed: raw fp16 scales and float tensors,
    the fixed tensors' code entropy, and a header allowance."""
    total = 1024.0
    for name, tp in plan.items():
        if tp.bits is None:
            total += tensors[name].numel() * tensors[name].element_size()
        else:
            total += 2 * sd[name].numel() // sd[name].shape[-1]
            if name not in free:
                total += _entropy_bytes(tensors[name].codes, tp.bits)
    return total


def _prune_to_fit(run: _BudgetRun, tensors: dict, plan: dict[str, TensorPlan], info: ArtifactInfo,
                  prunable: list[str], code_bytes: int) -> tuple[dict, ArtifactInfo]:
    """Zero the cheapest ±1 codes until the written artifact fits run.budget (each tensor's codes priced by
    golfquant.codec.sizemodel.ScaledEntropyPricer from its real compressed bytes; confirmed by compressing, the
    target lowered by the excess while over)."""
    quant = {n: tensors[n] for n in prunable}
    real = {t.name: t.codes_bytes for t in info.tensors}
    pricers = {n: ScaledEntropyPricer.fit(qt.codes.numpy(), real[n]) for n, qt in quant.items()}
    costs = {n: prune_costs(quant[n], run.h_diag(n), run.h_default) for n in prunable}
    fixed = info.total_bytes - sum(real[n] for n in prunable)
    target = run.budget - fixed
    best = None
    for _ in range(_PRUNE_ROUNDS):
        res = prune_to_bytes(quant, costs, pricers, target)
        if res is None:
            floor = fixed + pruned_floor(quant, costs, pricers)
            raise OptionError(f"budget {run.opts.budget:,} bytes cannot be met by pruning: zeroing every ±1 code "
                              f"leaves about {floor:,.0f} artifact bytes + {code_bytes:,} code bytes; raise the "
                              "budget or lower the widths (or let --budget allocate them)")
        run.meta["pruned_codes"] = res.pruned
        out = tensors | res.tensors
        info = run.write(out, plan)
        if info.total_bytes <= run.budget and (best is None or info.total_bytes > best[1].total_bytes):
            best = (out, info, res.pruned)
        if (1 - BUDGET_TOLERANCE / 2) * run.budget <= info.total_bytes <= run.budget:
            break
        # over: lower the target by the excess; well under: give back part of the gap
        target += (1 - BUDGET_TOLERANCE / 4) * run.budget - info.total_bytes
    if best is not None:
        if best[1] is not info:  # the last round was not the best one: write the best again
            run.meta["pruned_codes"] = best[2]
            best = (best[0], run.write(best[0], plan), best[2])
        return best[0], best[1]
    raise OptionError(f"pruning did not reach the budget of {run.opts.budget:,} bytes in {_PRUNE_ROUNDS} rounds "
                      f"(last: {info.total_bytes + code_bytes:,}); lower the widths or raise the budget")


@dataclass
class RoundtripOptions:
    val_pattern: str
    tokenizer: str
    max_tokens: int | None = 65536
    seq_len: int | None = None  # None: the model's training sequence length
    stride: int | None = None
    batch_seqs: int = 16
    num_heads: int | None = None
    model_spec: str | None = None
    model_args: dict | None = None
    packed: bool = False  # run quantized Linears from packed codes (kernels.QuantLinear)


@dataclass
class EvalSetup:
    """The float model and what its val_bpb needs, loaded once and checked against each other."""

    model: torch.nn.Module
    tokens: torch.Tensor
    luts: ByteLUTs
    seq_len: int


def prepare_eval(ckpt: Checkpoint, val_pattern: str, tokenizer, max_tokens: int | None, seq_len: int | None = None,
                 model_spec: str | None = None, num_heads: int | None = None,
                 model_args: dict | None = None) -> EvalSetup:
    """The first max_tokens + 1 validation tokens (all when None), the tokenizer's byte tables, the float model."""
    model = build_model(ckpt.state_dict, ckpt.config, model_spec, num_heads, model_args).eval()
    vocab = vocab_size(model)
    luts = build_byte_luts(tokenizer, vocab)
    check_tokenizer_fits(luts, vocab)
    tokens = load_tokens(val_pattern, None if max_tokens is None else max_tokens + 1)
    check_tokens_fit(tokens, min(vocab, luts.tokenizer_vocab))
    seq_len = seq_len or int(getattr(getattr(model, "config", None), "seq_len", 1024))
    return EvalSetup(model, tokens, luts, seq_len)


def roundtrip_eval(artifact_path, ckpt_path, opts: RoundtripOptions, progress: Progress | None = None) -> dict:
    """val_loss / val_bpb of the float checkpoint and of the artifact's dequantized weights, on the same tokens."""
    ev = prepare_eval(load_checkpoint(ckpt_path), opts.val_pattern, opts.tokenizer, opts.max_tokens, opts.seq_len,
                      opts.model_spec, opts.num_heads, opts.model_args)
    model, seq_len = ev.model, ev.seq_len

    def run(stage: str) -> EvalResult:
        return eval_val_bpb(model, ev.tokens, ev.luts, seq_len, batch_seqs=opts.batch_seqs, stride=opts.stride,
                            progress=_stage(progress, stage))

    float_res = run("float")
    load_quantized_weights(model, artifact_path, opts.packed)
    quant_res = run("quantized")
    return {
        "float": {"val_loss": float_res.val_loss, "val_bpb": float_res.val_bpb},
        "quantized": {"val_loss": quant_res.val_loss, "val_bpb": quant_res.val_bpb},
        "gap_bpb": quant_res.val_bpb - float_res.val_bpb,
        "tokens": float_res.tokens,
        "bytes": float_res.bytes,
        "seq_len": seq_len,
        "stride": opts.stride,
        "packed": opts.packed,
    }


def load_quantized_weights(model: torch.nn.Module, artifact_path, packed: bool = False) -> None:
    """Load the artifact's dequantized state_dict into the model; a shape mismatch names the tensor.

    packed=True keeps every quantized Linear weight packed: the Linear becomes a kernels.QuantLinear that
    dequantizes inside its matmul, so no float copy of those weights is made.
    """
    sd = load_artifact(artifact_path)
    own = model.state_dict()
    _check_same_tensors(own, sd, artifact_path)
    if packed:
        swapped = _swap_packed_linears(model, artifact_path)
        sd = {k: v for k, v in sd.items() if k not in swapped}
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=not packed)


def _swap_packed_linears(model: torch.nn.Module, artifact_path) -> set[str]:
    from kernels import swap_linears

    modules = dict(model.named_modules())
    weights = {}
    for name, value in read_artifact(artifact_path, packed=True).tensors.items():
        owner = modules.get(name.rsplit(".", 1)[0])
        if isinstance(value, PackedTensor) and isinstance(owner, torch.nn.Linear) and name.endswith(".weight"):
            lqer = None if value.lqer is None else (value.lqer.a(), value.lqer.b())
            weights[name] = (value.packed, value.bits, value.layout, value.shape, value.scales, lqer)
    swap_linears(model, weights)
    return set(weights)


def _check_same_tensors(own: dict, sd: dict, artifact_path) -> None:
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{wrong[0]} has shape {tuple(sd[wrong[0]].shape)}, the model {tuple(own[wrong[0]].shape)}")
        raise OptionError(f"artifact {artifact_path} does not match the model: {detail}")
