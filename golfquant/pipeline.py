"""The two directions of the pipeline, as library calls the CLI stays thin over.

quantize:  checkpoint -> plan -> [calibration tokens -> Hessians] -> QuantizedTensors -> artifact file
roundtrip: artifact -> dequantized state_dict -> model -> val_bpb, beside the float checkpoint's val_bpb
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from golfquant.artifact import PackedTensor, load_artifact, read_artifact, write_artifact
from golfquant.calib import CalibConfig, Hessian, calibration_tokens, capture_hessians
from golfquant.codepack import code_size
from golfquant.checkpoint import Checkpoint, load_checkpoint
from golfquant.data import build_byte_luts, check_tokenizer_fits, check_tokens_fit, load_tokens
from golfquant.errors import OptionError
from golfquant.evaluate import EvalResult, eval_val_bpb
from golfquant.factory import build_model
from golfquant.plan import PlanOptions, TensorPlan, make_plan
from golfquant.quant import QuantizedTensor
from golfquant.quant.clip import ClipSpec, hessian_weighted_error, parse_clip, round_codes, row_scales
from golfquant.quant.gptq import gptq_quantize
from golfquant.quant.lqer import apply_lqer, select_lqer_targets

METHODS = ("rtn", "gptq")
# Clip methods that read the tensor's Hessian; tensors without one fall back to plain k·std clipping.
_HESSIAN_CLIPS = ("hsdclip",)


@dataclass(frozen=True)
class LqerOptions:
    top: int = 0  # number of tensors corrected; 0 = off
    rank: int = 4
    a_bits: int = 2
    b_bits: int = 4
    group: int = 64


@dataclass
class QuantizeOptions:
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

    def validate(self) -> ClipSpec:
        if self.method not in METHODS:
            raise OptionError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.damp < 0 or self.block_size < 1:
            raise OptionError(f"damp must be >= 0 and block size >= 1, got {self.damp} and {self.block_size}")
        return parse_clip(self.clip)

    @property
    def needs_hessians(self) -> bool:
        return self.method == "gptq" or parse_clip(self.clip).method in _HESSIAN_CLIPS or self.lqer.top > 0


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
class QuantizeResult:
    tensors: dict[str, QuantizedTensor | torch.Tensor]
    plan: dict[str, TensorPlan]
    reports: list[TensorReport]
    meta: dict


Progress = Callable[[str, int, int], None]  # (stage, done, total)


def quantize_state_dict(ckpt: Checkpoint, opts: QuantizeOptions, progress: Progress | None = None,
                        on_tensor: Callable[[TensorReport], None] | None = None) -> QuantizeResult:
    spec = opts.validate()
    sd = ckpt.state_dict
    plan = make_plan(sd, opts.plan)
    meta: dict = {"method": opts.method, "clip": str(spec)}
    hessians: dict[str, Hessian] = {}
    if opts.needs_hessians and any(p.bits for p in plan.values()):
        hessians, meta["calibration"] = _calibrate(ckpt, opts, progress)
    out: dict[str, QuantizedTensor | torch.Tensor] = {}
    reports: list[TensorReport] = []
    damps: dict[str, float] = {}
    for name, tp in plan.items():
        t = sd[name]
        if tp.bits is None:
            out[name] = _passthrough(t, tp.scheme)
            continue
        h = hessians[name].H if name in hessians else None
        start = time.perf_counter()
        scales = row_scales(t.float(), tp.bits, _clip_for(spec, h), h, tp.role)
        if opts.method == "gptq" and h is not None:
            qt, stats = gptq_quantize(t.float(), h, tp.bits, scales, opts.block_size, opts.act_order, opts.damp)
            damps[name] = stats.damp_used
            ratio = stats.hessian_error / stats.rtn_error if stats.rtn_error > 0 else 1.0
            report = TensorReport(name, tp.role, tp.scheme, tp.bits, "gptq", 0.0, stats.damp_used, ratio)
        else:
            qt = QuantizedTensor(round_codes(t.float(), scales, tp.bits), scales, tp.bits)
            report = TensorReport(name, tp.role, tp.scheme, tp.bits, "rtn", 0.0)
        report.seconds = time.perf_counter() - start
        out[name] = qt
        reports.append(report)
        if on_tensor:
            on_tensor(report)
    if damps:
        meta["gptq"] = {"block_size": opts.block_size, "act_order": opts.act_order, "damp": damps}
    if opts.lqer.top > 0:
        meta["lqer"] = _apply_lqer(out, sd, hessians, opts.lqer)
    return QuantizeResult(out, plan, reports, meta)


def _clip_for(spec: ClipSpec, hessian: torch.Tensor | None) -> ClipSpec:
    if spec.method in _HESSIAN_CLIPS and hessian is None:
        return dataclasses.replace(spec, method="sdclip", lam=0.0)
    return spec


def _passthrough(t: torch.Tensor, scheme: str) -> torch.Tensor:
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}.get(scheme)
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _calibrate(ckpt: Checkpoint, opts: QuantizeOptions, progress: Progress | None) -> tuple[dict[str, Hessian], dict]:
    model = build_model(ckpt.state_dict, ckpt.config, opts.model_spec, opts.num_heads, opts.model_args).eval()
    start = time.perf_counter()
    tokens = calibration_tokens(model, opts.calib, _stage(progress, "calibration tokens"))
    gen_s = time.perf_counter() - start
    hessians = capture_hessians(model, tokens, batch=opts.calib.batch, progress=_stage(progress, "hessians"))
    info = dataclasses.asdict(opts.calib) | {"tokens": int(tokens.numel()), "generate_seconds": round(gen_s, 3),
                                              "hessian_seconds": round(time.perf_counter() - start - gen_s, 3)}
    return hessians, info


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
                        progress: Progress | None = None, on_tensor=None) -> dict:
    """Quantize a checkpoint file into an artifact file; returns a summary (the CLI's JSON)."""
    ckpt = load_checkpoint(ckpt_path)
    code_bytes = 0 if code_path is None else code_size(code_path, packed=packed_code)
    result = quantize_state_dict(ckpt, opts, progress, on_tensor)
    meta = result.meta | {"checkpoint": Path(ckpt_path).name, "model_config": ckpt.config}
    artifact_bytes = write_artifact(out_path, result.tensors, result.plan, meta).total_bytes
    return {
        "artifact": str(out_path),
        "artifact_bytes": artifact_bytes,
        "code_bytes": code_bytes,
        "total_bytes": artifact_bytes + code_bytes,
        "tensors": [{"name": tp.name, "role": tp.role, "scheme": tp.scheme, "bits": tp.bits}
                    for tp in result.plan.values()],
        "reports": [dataclasses.asdict(r) for r in result.reports],
        "meta": result.meta,
    }


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


def roundtrip_eval(artifact_path, ckpt_path, opts: RoundtripOptions, progress: Progress | None = None) -> dict:
    """val_loss / val_bpb of the float checkpoint and of the artifact's dequantized weights, on the same tokens."""
    ckpt = load_checkpoint(ckpt_path)
    model = build_model(ckpt.state_dict, ckpt.config, opts.model_spec, opts.num_heads, opts.model_args).eval()
    vocab = _vocab_size(model, ckpt.state_dict)
    luts = build_byte_luts(opts.tokenizer, vocab)
    check_tokenizer_fits(luts, vocab)
    max_tokens = None if opts.max_tokens is None else opts.max_tokens + 1
    tokens = load_tokens(opts.val_pattern, max_tokens)
    check_tokens_fit(tokens, vocab)
    seq_len = opts.seq_len or int(getattr(getattr(model, "config", None), "seq_len", 1024))

    def run(stage: str) -> EvalResult:
        return eval_val_bpb(model, tokens, luts, seq_len, batch_seqs=opts.batch_seqs, stride=opts.stride,
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


def _vocab_size(model: torch.nn.Module, sd: dict) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        return int(config.vocab_size)
    return int(sd["tok_emb.weight"].shape[0])
