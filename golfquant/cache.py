"""The caches of `--budget`, kept next to the output: the calibration (Hessians and held-out tokens, safetensors)
and the measurement (JSON, ExLlamaV2's measurement.json for this format).

Each is keyed by the checkpoint's digest and by the options that shaped it: a second run on the same inputs (another
budget, a sweep) reads them, anything else (another checkpoint, other options, a damaged or foreign file) is made
again. A cache is never trusted further than its key, and it holds exactly what was computed (fp32 Hessians, the
measurement's floats in round-trip form), so a cached run writes the same bytes as a fresh one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from golfquant.atomic import atomic_path, atomic_write_text
from golfquant.calib import Hessian
from golfquant.measure import VERSION, Measurement
from golfquant.pipeline import Calibration


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state_dict's names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


CALIBRATION_VERSION = 1  # of the calibration's meaning: bump when its Hessians or held-out tokens change


def cache_key(digest: str, options: Mapping, version: int = VERSION) -> str:
    """The key of a cached measurement (version: measure.VERSION) or calibration (CALIBRATION_VERSION): the
    checkpoint's digest and the options that shaped it. Two versions, so that a new measurement keeps the
    calibration it was made from."""
    text = json.dumps({"version": version, "checkpoint": digest, "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_paths(stem: Path) -> tuple[Path, Path]:
    """(calibration, measurement) cache files of an output path's stem: out/model -> out/model.calibration.safetensors,
    out/model.measurement.json."""
    return stem.with_name(stem.name + ".calibration.safetensors"), stem.with_name(stem.name + ".measurement.json")


def save_measurement(path: Path, measurement: Measurement) -> None:
    atomic_write_text(path, json.dumps(measurement.to_json(), separators=(",", ":")) + "\n")


def read_measurement(path: Path) -> Measurement:
    """A saved measurement, whatever it was made for (OSError, ValueError, KeyError or TypeError when unreadable)."""
    m = Measurement.from_json(json.loads(Path(path).read_text()))
    m.info.cached = True
    return m


def load_measurement(path: Path, key: str) -> Measurement | None:
    """The measurement at path when it was made for `key`, else None (absent, stale or unreadable)."""
    try:
        m = read_measurement(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return m if m.key == key else None


def save_calibration(path: Path, key: str, calibration: Calibration) -> None:
    """Hessians (each shared one once), the held-out tokens and the calibration's info."""
    index: dict[int, int] = {}
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, int] = {}
    counts: dict[str, int] = {}
    for name, h in calibration.hessians.items():
        if id(h) not in index:
            index[id(h)] = len(index)
            tensors[f"h{index[id(h)]}"] = h.H.contiguous()
            counts[str(index[id(h)])] = h.tokens
        names[name] = index[id(h)]
    if calibration.heldout is not None:
        tensors["heldout"] = calibration.heldout.contiguous()
    meta = {"key": key, "names": json.dumps(names), "tokens": json.dumps(counts), "info": json.dumps(calibration.info)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_calibration(path: Path, key: str) -> Calibration | None:
    """The calibration at path when it was made for `key`, else None (absent, stale or unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            return None
        tensors = load_file(str(path))
        names, counts = json.loads(meta["names"]), json.loads(meta["tokens"])
        shared = {int(i): Hessian(tensors[f"h{i}"], int(n)) for i, n in counts.items()}
        return Calibration({name: shared[int(i)] for name, i in names.items()}, json.loads(meta["info"]),
                           heldout=tensors.get("heldout"))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError):
        return None
