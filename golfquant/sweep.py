"""Rate-distortion sweep: for every method and byte budget, the val_bpb of an artifact that fits the budget.

Methods (SWEEP_METHODS):
* `rtn`, `gptq`, `gptq+lqer`: one uniform quantizer for every matrix, pushed to the budget by its step size.
  Step level t means the records' SDClip step times 2^t for every role (`uniform_setting`); the width follows t
  so that the clip range stays between 1 and 2 times the records' k for the roles the records tuned at int6.
  t comes from an order-0 entropy estimate of the RTN codes (`SizeCurve`) corrected by the ratio of real to
  estimated bytes of the method's previous artifact. rtn and gptq aim a little over the budget and let the pipeline's pruning
  (QuantizeOptions.prune_to_budget) trim the rest; the pipeline does not prune with LQER, so `gptq+lqer` aims
  under and stops within _SLACK of the budget (or after _ATTEMPTS artifacts, keeping the largest that fits).
  LQER is the records' setting: the 3 worst tensors, rank 4 (brief §2.14).
* `auto`: the pipeline's per-tensor allocation of width and SDClip k (QuantizeOptions.budget), with GPTQ.

Calibration runs once per sweep and its Hessians are shared by every point; the float model is evaluated once, and
every artifact is evaluated on the same tokens.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from golfquant.api import QuantizeResult, quantize
from golfquant.atomic import atomic_write_text
from golfquant.calib import CalibConfig
from golfquant.checkpoint import Checkpoint, load_checkpoint
from golfquant.codec.sizemodel import order0_bytes
from golfquant.codepack import code_size
from golfquant.distributed import on_main, resolve_device
from golfquant.errors import GolfquantError, OptionError
from golfquant.evaluate import eval_val_bpb
from golfquant.options import QuantizeOptions
from golfquant.pipeline import Calibration, Progress, build_float_model, calibrate, stage
from golfquant.plan import FLOAT_SCHEMES, PlanOptions, make_plan
from golfquant.quant.clip import parse_clip, round_codes, row_scales
from golfquant.quant.lqer import LqerOptions
from golfquant.quant.qtensor import MAX_BITS, MIN_BITS
from golfquant.report import CAP_BYTES
from golfquant.roundtrip import load_quantized_weights, prepare_eval

SWEEP_METHODS = ("rtn", "gptq", "gptq+lqer", "auto")
DEFAULT_FRACTIONS = (0.25, 0.35, 0.5)  # default budgets, as fractions of the model's int8 bytes
DEFAULT_MAX_TOKENS = 32768
RECORD_LQER = LqerOptions(top=3, rank=4)
STEP_RANGE = (-2.0, 4.75)  # step levels t: int8 (from t = -2) .. int2 (t in [4, 5)); the width saturates outside
_GRID = 0.25  # spacing of the step levels whose size is estimated
_ATTEMPTS = 3  # artifacts per uniform point
_SLACK = 0.01  # a uniform point within this fraction under its budget is done
_AIM = 0.005  # prunable methods aim this fraction over the budget (pruning trims it), LQER this fraction under



@dataclass
class SweepOptions:
    val_pattern: str
    tokenizer: str
    budgets: tuple[int, ...] = ()  # decimal bytes of artifact + code; () = DEFAULT_FRACTIONS of int8_bytes
    methods: tuple[str, ...] = SWEEP_METHODS
    out_dir: Path = Path("out/sweep")
    code_path: Path | None = None
    packed_code: bool = False
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    batch_seqs: int = 16
    float_max_numel: int = 65536
    calib: CalibConfig = field(default_factory=CalibConfig)
    device: str = "auto"  # where calibration, GPTQ and evaluation run (golfquant.distributed.resolve_device)

    def validate(self) -> None:
        resolve_device(self.device)
        unknown = [m for m in self.methods if m not in SWEEP_METHODS]
        if unknown or not self.methods:
            raise OptionError(f"methods {','.join(self.methods) or '(none)'}: use one or more of {','.join(SWEEP_METHODS)}")
        if any(b <= 0 for b in self.budgets):
            raise OptionError(f"budgets must be positive byte counts, got {list(self.budgets)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise OptionError(f"max tokens must be >= 1 (or None for all), got {self.max_tokens}")


@dataclass(frozen=True)
class UniformSetting:
    step: float  # t: the quantization step is the records' int6 SDClip step times 2^t
    bits: int
    clip: str


def uniform_setting(t: float) -> UniformSetting:
    """Width and SDClip spec of the uniform quantizer at step level t: bits = 6 - floor(t) for every matrix, and
    each role's k is the records' k for that role at this width (golfquant.quant.clip.record_k) times 2^t, so
    every role's step is the records' step for it times 2^t. The clip range of the roles the records tuned at
    int6 is then 1 to 2 times their k: clipping more than the records did costs more bpb than the few bytes it
    saves."""
    bits = min(MAX_BITS, max(MIN_BITS, 6 - math.floor(t)))
    ks = ",".join(f"{role}={round(k * 2.0 ** t, 4)!r}" for role, k in parse_clip("sdclip").k_by_role(bits).items())
    return UniformSetting(t, bits, f"sdclip:{ks}")


def uniform_plan(bits: int, float_max_numel: int) -> PlanOptions:
    scheme = f"int{bits}"
    return PlanOptions(mlp=scheme, attn=scheme, embed=scheme, other=scheme, float_max_numel=float_max_numel)


def int8_bytes(state_dict: dict[str, torch.Tensor], float_max_numel: int = 65536) -> int:
    """Raw bytes of the model at int8: one byte per quantized weight plus its fp16 row scales, float tensors as
    the plan stores them (the reference the default budgets are fractions of)."""
    total = 0
    for name, tp in make_plan(state_dict, uniform_plan(8, float_max_numel)).items():
        t = state_dict[name]
        if tp.bits is None:
            dtype = FLOAT_SCHEMES.get(tp.scheme) if t.is_floating_point() else None
            total += t.numel() * (t.element_size() if dtype is None else dtype.itemsize)
        else:
            total += t.numel() + 2 * (t.numel() // t.shape[-1])
    return total


class SizeCurve:
    """Estimated artifact bytes of the uniform quantizer against the step level t, on a grid over STEP_RANGE:
    order-0 entropy of the RTN codes, plus fp16 row scales and the float tensors at their raw size."""

    def __init__(self, state_dict: dict[str, torch.Tensor], float_max_numel: int):
        plan = make_plan(state_dict, uniform_plan(8, float_max_numel))
        quantized = [(state_dict[n].float(), tp.role) for n, tp in plan.items() if tp.bits is not None]
        fixed = int8_bytes(state_dict, float_max_numel) - sum(w.numel() for w, _ in quantized)
        steps = round((STEP_RANGE[1] - STEP_RANGE[0]) / _GRID)
        self.ts = [STEP_RANGE[0] + i * _GRID for i in range(steps + 1)]
        self.bytes = [fixed + sum(_entropy_bytes(w, role, uniform_setting(t)) for w, role in quantized)
                      for t in self.ts]

    def estimate(self, t: float) -> float:
        """log-linear interpolation between the grid points."""
        i = min(max(0, int((t - self.ts[0]) // _GRID)), len(self.ts) - 2)
        frac = (t - self.ts[i]) / _GRID
        return math.exp((1 - frac) * math.log(self.bytes[i]) + frac * math.log(self.bytes[i + 1]))

    def solve(self, target: float) -> float:
        """The smallest step level whose estimate is <= target (the ends of STEP_RANGE when out of reach)."""
        if self.bytes[0] <= target:
            return self.ts[0]
        for i in range(1, len(self.ts)):
            if self.bytes[i] <= target:
                hi, lo = math.log(self.bytes[i - 1]), math.log(self.bytes[i])
                frac = (hi - math.log(target)) / (hi - lo) if hi > lo else 1.0
                return self.ts[i - 1] + frac * _GRID
        return self.ts[-1]


def _entropy_bytes(w: torch.Tensor, role: str, setting: UniformSetting) -> float:
    return order0_bytes(round_codes(w, row_scales(w, setting.bits, parse_clip(setting.clip), None, role),
                                    setting.bits).numpy())


@dataclass
class SweepPoint:
    method: str
    budget: int
    artifact: str | None = None
    artifact_bytes: int | None = None
    code_bytes: int = 0
    total_bytes: int | None = None
    val_bpb: float | None = None
    gap_bpb: float | None = None
    bits: str | None = None  # "int5" for a uniform point, "int4 x12, int5 x13" for an allocation
    clip: str | None = None  # a uniform point's clip
    step: float | None = None  # a uniform point's step level t
    pruned_codes: int = 0
    attempts: int = 0  # artifacts written for this point
    error: str | None = None  # why the budget could not be met


@dataclass
class SweepResult:
    checkpoint: str
    float_bpb: float
    eval_tokens: int
    code_bytes: int
    int8_bytes: int
    budgets: list[int]
    budgets_from: str  # "given" or "fractions of int8_bytes"
    points: list[SweepPoint]
    cap: int = CAP_BYTES

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sweep(ckpt_path, opts: SweepOptions, progress: Progress | None = None,
          on_point: Callable[[SweepPoint], None] | None = None) -> SweepResult:
    """Quantize ckpt_path with every method at every budget into opts.out_dir, evaluate each artifact, and write
    opts.out_dir/sweep.json. A budget a method cannot meet gives a point with `error` set; the sweep goes on.
    The checkpoint is read once; one float model serves every quantization, another every evaluation."""
    opts.validate()
    ckpt = load_checkpoint(ckpt_path)
    code_bytes = 0 if opts.code_path is None else code_size(opts.code_path, packed=opts.packed_code)
    reference = int8_bytes(ckpt.state_dict, opts.float_max_numel)
    budgets = list(opts.budgets) or [round(f * reference) for f in DEFAULT_FRACTIONS]
    evaluator = _Evaluator(ckpt, opts)
    float_bpb = evaluator.bpb(None, progress)
    base = QuantizeOptions(calib=opts.calib, device=opts.device)
    model = build_float_model(ckpt, base)
    calibration = calibrate(ckpt, base, progress, model=model, heldout="auto" in opts.methods)
    run = _Run(ckpt, model, opts, code_bytes, calibration, progress)
    points = []
    for method in opts.methods:
        for budget in sorted(budgets):
            point = run.point(method, budget)
            if point.error is None:
                point.val_bpb = evaluator.bpb(point.artifact, progress)
                point.gap_bpb = point.val_bpb - float_bpb
            points.append(point)
            if on_point:
                on_point(point)
    result = SweepResult(Path(ckpt_path).name, float_bpb, evaluator.tokens.numel() - 1, code_bytes, reference,
                         sorted(budgets), "given" if opts.budgets else "fractions of int8_bytes", points)
    on_main(lambda: atomic_write_text(Path(opts.out_dir) / "sweep.json", json.dumps(result.to_dict(), indent=1) + "\n"))
    return result


class _Evaluator:
    """The float model and the validation tokens, loaded once; each artifact's weights are loaded into the model."""

    def __init__(self, ckpt: Checkpoint, opts: SweepOptions):
        ev = prepare_eval(ckpt, opts.val_pattern, opts.tokenizer, opts.max_tokens)
        self.device = resolve_device(opts.device)
        self.model, self.tokens, self.luts, self.seq_len = ev.model.to(self.device), ev.tokens, ev.luts, ev.seq_len
        self.float_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.batch_seqs = opts.batch_seqs

    def bpb(self, artifact: str | None, progress: Progress | None) -> float:
        """val_bpb of the artifact's dequantized weights, or of the float model for None."""
        if artifact is None:
            self.model.load_state_dict(self.float_state)
        else:
            load_quantized_weights(self.model, artifact)
        res = eval_val_bpb(self.model, self.tokens, self.luts, self.seq_len, batch_seqs=self.batch_seqs,
                           device=self.device, progress=stage(progress, "val_bpb"))
        return res.val_bpb


class _Run:
    """Quantizes and writes the artifact of one (method, budget) point; learns each uniform method's
    real/estimated size ratio."""

    def __init__(self, ckpt: Checkpoint, model: torch.nn.Module, opts: SweepOptions, code_bytes: int,
                 calibration: Calibration, progress: Progress | None):
        self.ckpt, self.model, self.opts, self.code_bytes, self.progress = ckpt, model, opts, code_bytes, progress
        self.calibration = calibration
        self.ratio: dict[str, float] = {}
        self._curve: SizeCurve | None = None

    @property
    def curve(self) -> SizeCurve:
        if self._curve is None:
            self._curve = SizeCurve(self.ckpt.state_dict, self.opts.float_max_numel)
        return self._curve

    def point(self, method: str, budget: int) -> SweepPoint:
        point = SweepPoint(method, budget, code_bytes=self.code_bytes)
        try:
            if method == "auto":
                self._auto(point)
            else:
                self._uniform(point)
        except GolfquantError as e:
            point.error = str(e)
        return point

    def _path(self, point: SweepPoint) -> Path:
        stem = f"{re.sub(r'[^A-Za-z0-9]+', '-', point.method)}_{point.budget}"
        return Path(self.opts.out_dir) / "artifacts" / f"{stem}.gqa"

    def _quantize(self, opts: QuantizeOptions, cache: Path | None = None) -> QuantizeResult:
        return quantize(self.model, opts, config=self.ckpt.config, code_bytes=self.code_bytes, progress=self.progress,
                        calibration=self.calibration, cache=cache)

    def _auto(self, point: SweepPoint) -> None:
        # one measurement for every budget: the first point makes it, the others read it
        result = self._quantize(QuantizeOptions(calib=self.opts.calib, budget=point.budget, device=self.opts.device),
                                cache=Path(self.opts.out_dir) / "artifacts" / "auto")
        schemes = Counter(a.scheme for a in result.budget.allocation)
        point.bits = ", ".join(f"{s} x{n}" for s, n in sorted(schemes.items()))
        point.pruned_codes, point.attempts = result.budget.pruned_codes, 1
        self._record(point, result)

    def _uniform(self, point: SweepPoint) -> None:
        """Up to _ATTEMPTS artifacts, each aimed with the size ratio learned so far and kept inside the bracket of
        step levels already seen to fit (upper end) or not (lower end); keeps the largest artifact that fits."""
        lqer = point.method == "gptq+lqer"
        room = point.budget - self.code_bytes
        if room <= 0:
            raise OptionError(f"budget {point.budget:,} bytes is used up by the {self.code_bytes:,} code bytes alone")
        over, under = STEP_RANGE[0] - _GRID, STEP_RANGE[1] + _GRID  # bracket: t too fine / t known to fit
        best: tuple[QuantizeResult, UniformSetting] | None = None
        smallest = None
        for attempt in range(1, _ATTEMPTS + 1):
            ratio = self.ratio.get(point.method, self.ratio.get("gptq", 1.0))
            t = self.curve.solve(room * (1 - _AIM if lqer else 1 + _AIM) / ratio)
            setting = uniform_setting(t if over < t < under else 0.5 * (over + under))
            result = self._quantize(self._uniform_options(point, setting, lqer))
            point.attempts = attempt
            smallest = min(smallest or result.total_bytes, result.total_bytes)
            pruned = result.budget.pruned_codes if result.budget else 0
            if not pruned:  # an unpruned size measures the estimate's error
                self.ratio[point.method] = len(result.data) / self.curve.estimate(setting.step)
            if result.total_bytes > point.budget:
                over = max(over, setting.step)
                if setting.step >= STEP_RANGE[1]:
                    break
                continue
            under = min(under, setting.step)
            if best is None or result.total_bytes > best[0].total_bytes:
                best = (result, setting)
            if pruned or result.total_bytes >= (1 - _SLACK) * point.budget or setting.step <= STEP_RANGE[0]:
                break
        if best is None:
            raise OptionError(f"{point.method}: no uniform width fits {point.budget:,} bytes (the smallest "
                              f"artifact tried was {smallest:,} bytes in all); raise the budget")
        result, setting = best
        point.bits, point.clip, point.step = f"int{setting.bits}", setting.clip, round(setting.step, 4)
        point.pruned_codes = result.budget.pruned_codes if result.budget else 0
        self._record(point, result)

    def _uniform_options(self, point: SweepPoint, setting: UniformSetting, lqer: bool) -> QuantizeOptions:
        return QuantizeOptions(plan=uniform_plan(setting.bits, self.opts.float_max_numel),
                               method="rtn" if point.method == "rtn" else "gptq", clip=setting.clip,
                               calib=self.opts.calib, lqer=RECORD_LQER if lqer else LqerOptions(),
                               budget=None if lqer else point.budget, prune_to_budget=not lqer,
                               device=self.opts.device)

    def _record(self, point: SweepPoint, result: QuantizeResult) -> None:
        path = self._path(point)
        on_main(lambda: result.save(path))  # every rank then reads it (on_main returns after the write)
        point.artifact = str(path)
        point.artifact_bytes, point.total_bytes = len(result.data), result.total_bytes
