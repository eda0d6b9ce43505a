"""What to quantize and how: one frozen object, validated and resolved when it is made.

`clip` may be given as spec text ("sdclip:12.85,embed=20"); it is parsed once, here, into a ClipSpec. Which roles,
clip and float tensors the user fixed under a budget are explicit fields, not inferred from defaults: the CLI sets
them from the flags typed. An impossible combination raises OptionError at construction, so no later step sees it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from golfquant.calib import CalibConfig
from golfquant.distributed import resolve_device
from golfquant.errors import OptionError
from golfquant.plan import PlanOptions
from golfquant.quant.clip import ClipSpec, parse_clip
from golfquant.quant.lqer import LqerOptions
from golfquant.quant.qtensor import Rotation
from golfquant.quant.quantize import HESSIAN_CLIPS, METHODS, Quantizer
from golfquant.quant.rotate import parse_rotate, rotation_for
from golfquant.quant.salient import SalientOptions


@dataclass(frozen=True)
class QuantizeOptions:
    """With `budget` (decimal bytes of artifact + code) golfquant.budget chooses every free tensor's storage (fp16,
    or a width, clip and LQER correction) by measured damage; tensors of the roles in `fixed_roles` and tensors
    matched by a plan rule keep the plan's scheme; with `fixed_clip` the clip is the given one (only widths are
    free); with `fixed_float` the float-size convention (`plan.float_max_numel`) still keeps small tensors in fp16.
    With `prune_to_budget` the plan is kept as it is and the cheapest ±1 codes are zeroed until it fits.
    `rotate` (golfquant.quant.rotate): `none`, `hadamard[:BLOCK]` (every quantized tensor in a rotated basis) or,
    with a budget, `auto` (each free tensor's integer candidates measured with and without rotation)."""

    plan: PlanOptions = field(default_factory=PlanOptions)
    method: str = "gptq"
    clip: ClipSpec = parse_clip("amax")  # spec text is accepted and parsed
    calib: CalibConfig = field(default_factory=CalibConfig)
    block_size: int = 128
    act_order: bool = True
    damp: float = 0.01
    lqer: LqerOptions = field(default_factory=LqerOptions)
    salient: SalientOptions = field(default_factory=SalientOptions)  # every matrix with a Hessian that fits
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
    device: str = "auto"  # where calibration and GPTQ run: auto (CUDA when available), cpu, cuda, cuda:N
    rotate: str = "none"  # none | hadamard | hadamard:BLOCK | auto

    def __post_init__(self) -> None:
        resolve_device(self.device)  # a CUDA device on a machine without one is refused here
        if isinstance(self.clip, str):
            object.__setattr__(self, "clip", parse_clip(self.clip))
        object.__setattr__(self, "fixed_roles", tuple(self.fixed_roles))
        kind, block = parse_rotate(self.rotate)
        object.__setattr__(self, "rotate", kind if block is None else f"{kind}:{block}")
        if kind == "auto" and (self.budget is None or self.prune_to_budget):
            raise OptionError("--rotate auto lets --budget choose rotations by measurement: add --budget BYTES "
                              "(without --prune-to-budget), or use --rotate hadamard")
        if self.method not in METHODS:
            raise OptionError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.damp < 0 or self.block_size < 1:
            raise OptionError(f"damp must be >= 0 and block size >= 1, got {self.damp} and {self.block_size}")
        if self.prune_to_budget and self.budget is None:
            raise OptionError("--prune-to-budget needs --budget BYTES (e.g. --budget 16000000)")
        if self.budget is not None:
            if self.budget <= 0:
                raise OptionError(f"budget must be a positive number of bytes, got {self.budget}")
            if self.clip.method == "size":
                raise OptionError("--clip size and --budget both choose the size: drop one of them")
            if self.lqer.top > 0:
                raise OptionError("--lqer cannot be combined with --prune-to-budget: drop one of them"
                                  if self.prune_to_budget else
                                  "--budget buys LQER corrections per tensor where they pay: drop --lqer")
            if self.salient.top > 0 and not self.salient.auto:
                raise OptionError("--salient cannot be combined with --prune-to-budget: drop one of them"
                                  if self.prune_to_budget else
                                  "--budget buys salient column groups per tensor where they pay: drop --salient")
            if self.sequential:
                raise OptionError("--sequential cannot be combined with --budget yet: drop one of them")
        if self.salient.auto and (self.budget is None or self.prune_to_budget):
            raise OptionError("--salient auto lets --budget buy salient groups per tensor: add --budget BYTES "
                              "(without --prune-to-budget), or give the groups of every matrix (top=1,group=64)")
        if self.sequential and self.method != "gptq":
            raise OptionError("--sequential quantizes block by block with GPTQ: add --method gptq")

    @property
    def needs_hessians(self) -> bool:
        return (self.method == "gptq" or self.clip.method in HESSIAN_CLIPS or self.lqer.top > 0 or self.salient.top > 0
                or (self.budget is not None and not self.prune_to_budget))

    def rotation_for(self, name: str, shape) -> Rotation | None:
        """The rotation of a tensor the plan quantizes (None for `none`, and for the fixed tensors under `auto`)."""
        return None if self.rotate in ("none", "auto") else rotation_for(self.rotate, name, shape[-1])

    @property
    def quantizer(self) -> Quantizer:
        return Quantizer(self.method, self.block_size, self.act_order, self.damp, resolve_device(self.device))
