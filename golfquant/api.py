"""The entry point: a model (or its state_dict) in, an artifact out, in memory. Files are the caller's business.

    result = golfquant.quantize(model, QuantizeOptions(budget=16_000_000), code_bytes=len(code))
    result.save("final_model.gqa")

The symmetric half is golfquant.load_artifact (or, inside a train_gpt.py, the loader `golfquant export-loader`
writes). `quantize_checkpoint` is the same call on a checkpoint file, as the CLI makes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from golfquant.artifact import ArtifactInfo, EncodedArtifact, encode_artifact
from golfquant.budget import BudgetReport, quantize_to_budget
from golfquant.checkpoint import Checkpoint, load_checkpoint
from golfquant.measure import Measurement
from golfquant.options import QuantizeOptions
from golfquant.pipeline import Calibration, Progress, TensorReport, quantize_with_plan
from golfquant.plan import TensorPlan
from golfquant.quant import QuantizedTensor


@dataclass
class QuantizeResult:
    """The artifact's bytes and what went into them. `save(path)` writes it atomically."""

    data: bytes
    info: ArtifactInfo  # where every byte goes
    tensors: dict[str, QuantizedTensor | torch.Tensor]  # the stored values, as load_artifact would rebuild them
    plan: dict[str, TensorPlan]
    reports: list[TensorReport]  # one per quantized matrix
    meta: dict  # the manifest's meta
    code_bytes: int
    budget: BudgetReport | None  # with QuantizeOptions.budget: what was chosen and why

    @property
    def total_bytes(self) -> int:
        return len(self.data) + self.code_bytes

    def save(self, path: str | Path) -> ArtifactInfo:
        self.info = EncodedArtifact(self.data, self.info).save(path)
        return self.info


def quantize(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
             options: QuantizeOptions = QuantizeOptions(), *, config: dict | None = None, code_bytes: int = 0,
             meta: dict | None = None, progress: Progress | None = None,
             on_tensor: Callable[[TensorReport], None] | None = None, calibration: Calibration | None = None,
             measurement: Measurement | None = None, cache: str | Path | None = None) -> QuantizeResult:
    """Quantize a float model into an artifact, in memory.

    model_or_state_dict: the model itself (calibration runs it on whatever device it is on; its weights are read,
    never changed, except by a --sequential calibration) or a state_dict (golfquant's GPT, configured by `config`
    or by the shapes; or options.model_spec's class). code_bytes: the bytes of the code that counts toward
    options.budget. meta: extra manifest fields. calibration / measurement: reuse them across calls (a sweep).
    cache: with a budget, the stem of the calibration and measurement caches (golfquant.cache), None for none.
    """
    model = model_or_state_dict if isinstance(model_or_state_dict, nn.Module) else None
    if model is not None:
        own = getattr(model, "config", None)
        config = config or (own.to_dict() if hasattr(own, "to_dict") else None)
        state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    else:
        state_dict = dict(model_or_state_dict)
    ckpt = Checkpoint(state_dict, config)
    extra = dict(meta or {}) | {"model_config": config}
    if options.budget is None:
        q = quantize_with_plan(ckpt, options, progress, on_tensor, calibration, model)
        encoded, report = encode_artifact(q.tensors, q.plan, q.meta | extra, exhaustive=options.exhaustive), None
    else:
        q, encoded, report = quantize_to_budget(ckpt, options, code_bytes, extra, None if cache is None else Path(cache),
                                                progress, calibration, measurement, model)
        for r in q.reports if on_tensor else ():
            on_tensor(r)
    return QuantizeResult(encoded.data, encoded.info, q.tensors, q.plan, q.reports, q.meta | extra, code_bytes, report)


def quantize_checkpoint(path: str | Path, options: QuantizeOptions = QuantizeOptions(), **kwargs) -> QuantizeResult:
    """quantize() on a checkpoint file (golfquant.checkpoint formats: a bare state_dict, golfquant's own, or
    safetensors); the manifest names the file."""
    ckpt = load_checkpoint(path)
    meta = {"checkpoint": Path(path).name} | kwargs.pop("meta", {})
    return quantize(ckpt.state_dict, options, config=ckpt.config, meta=meta, **kwargs)
