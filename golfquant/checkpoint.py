"""Safe checkpoint I/O.

Reads the challenge's bare `final_model.pt` state_dict, golfquant's own checkpoints (state_dict + config),
and safetensors files. Never executes pickled code: `.pt` files go through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from golfquant.atomic import atomic_write_bytes
from golfquant.errors import CheckpointError

FORMAT = "golfquant-checkpoint-v1"
_SAFETENSORS_CONFIG_KEY = "golfquant_config"


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: dict | None = None  # GPTConfig fields; None for a bare state_dict such as final_model.pt
    extra: dict = field(default_factory=dict)


def save_checkpoint(path, state_dict: dict, config: dict | None, extra: dict | None = None) -> None:
    payload = {"format": FORMAT, "model": dict(state_dict), "config": config, "extra": extra or {}}
    buf = io.BytesIO()  # torch.save names the zip after its target file: a fixed name keeps the bytes deterministic
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path, check_finite: bool = True) -> Checkpoint:
    p = _existing_file(path)
    if p.suffix == ".safetensors":
        ckpt = _load_safetensors(p)
    else:
        ckpt = _from_payload(_torch_load(p), p)
    if check_finite:
        _check_finite(ckpt.state_dict, p)
    return ckpt


def _existing_file(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, expected a checkpoint file (.pt or .safetensors)")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file, not a checkpoint")
    return p


def _torch_load(p: Path):
    _check_zip_crcs(p)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{p}: refused, it holds more than plain tensors and containers ({_refusal_reason(e)}); "
            "golfquant never runs pickled code"
        ) from None
    except Exception as e:  # a damaged or foreign file fails anywhere in torch.load, with any exception type
        raise CheckpointError(f"{p}: not a PyTorch checkpoint ({type(e).__name__})") from None


def _check_zip_crcs(p: Path) -> None:
    """torch's zip reader does not check the members' CRCs, so a damaged file would load with wrong weights."""
    if not zipfile.is_zipfile(p):
        return  # the legacy format: torch.load's own errors are all there is
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except Exception as e:  # a damaged directory fails anywhere in zipfile, with any exception type
        raise CheckpointError(f"{p}: damaged zip container ({type(e).__name__})") from None
    if bad is not None:
        raise CheckpointError(f"{p}: damaged (CRC mismatch in {bad})")


def _refusal_reason(e: Exception) -> str:
    """The line of torch's message naming what was refused; its first lines advise weights_only=False."""
    for line in str(e).splitlines():
        if "unsupported" in line.lower():
            return line.split("error:")[-1].strip().split(". ")[0][:160]
    return "unsupported pickle content"


def _from_payload(obj, p: Path) -> Checkpoint:
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        sd, config, extra = obj.get("model"), obj.get("config"), obj.get("extra") or {}
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd, config, extra = obj["model"], obj.get("config"), {}
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd, config, extra = obj["state_dict"], obj.get("config"), {}
    else:
        sd, config, extra = obj, None, {}
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{p}: no state_dict found (expected a dict of tensors)")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{p}: entry {bad[0]!r} is not a tensor; expected a state_dict")
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"{p}: 'config' must be a dict of model settings")
    return Checkpoint(dict(sd), config, dict(extra))


def _load_safetensors(p: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: not a safetensors file ({str(e).splitlines()[0][:120]})") from None
    config = None
    if _SAFETENSORS_CONFIG_KEY in meta:
        try:
            config = json.loads(meta[_SAFETENSORS_CONFIG_KEY])
        except json.JSONDecodeError:
            raise CheckpointError(f"{p}: metadata '{_SAFETENSORS_CONFIG_KEY}' is not valid JSON") from None
    if not sd:
        raise CheckpointError(f"{p}: holds no tensors")
    return Checkpoint(sd, config, {})


def _check_finite(sd: dict[str, torch.Tensor], p: Path) -> None:
    for name, t in sd.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            raise CheckpointError(f"{p}: tensor {name!r} has {n_nan} NaN and {n_inf} Inf values")

