"""Checkpoint file in, artifact file out: the call the `quantize` command and the sweep make."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from golfquant.artifact import encode_artifact
from golfquant.budget import quantize_to_budget
from golfquant.checkpoint import load_checkpoint
from golfquant.codepack import code_size
from golfquant.measure import Measurement
from golfquant.pipeline import Calibration, Progress, QuantizeOptions, quantize_state_dict


def quantize_checkpoint(ckpt_path, out_path, opts: QuantizeOptions, code_path=None, packed_code: bool = False,
                        progress: Progress | None = None, on_tensor=None, calibration: Calibration | None = None,
                        measurement: Measurement | None = None, cache: bool | Path = True) -> dict:
    """Quantize a checkpoint file into an artifact file, written once; returns a summary (the CLI's JSON).

    With opts.budget the calibration and the measurement are cached next to the output (out/model.gqa ->
    out/model.calibration.safetensors, out/model.measurement.json); cache=PATH puts them at PATH.* instead,
    cache=False nowhere."""
    ckpt = load_checkpoint(ckpt_path)
    out_path = Path(out_path)
    code_bytes = 0 if code_path is None else code_size(code_path, packed=packed_code)
    extra = {"checkpoint": Path(ckpt_path).name, "model_config": ckpt.config}
    budget_summary: dict = {}
    if opts.budget is None:
        result = quantize_state_dict(ckpt, opts, progress, on_tensor, calibration)
        info = encode_artifact(result.tensors, result.plan, result.meta | extra, exhaustive=opts.exhaustive).save(out_path)
    else:
        stem = Path(cache) if not isinstance(cache, bool) else out_path.with_suffix("") if cache else None
        res = quantize_to_budget(ckpt, opts, code_bytes, extra, stem, progress, on_tensor, calibration, measurement)
        result, info = res.result, res.encoded.save(out_path)
        budget_summary = res.summary()
    return {
        "artifact": str(out_path),
        "artifact_bytes": info.total_bytes,
        "code_bytes": code_bytes,
        "total_bytes": info.total_bytes + code_bytes,
        "tensors": [{"name": tp.name, "role": tp.role, "scheme": tp.scheme, "bits": tp.bits}
                    for tp in result.plan.values()],
        "reports": [dataclasses.asdict(r) for r in result.reports],
        "meta": result.meta,
    } | budget_summary
