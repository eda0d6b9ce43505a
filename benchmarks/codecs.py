"""Artifact bytes against the records' serializer over the same codes; size-model error; writer and decode speed.

Run: .venv/bin/python benchmarks/codecs.py [--no-exhaustive]   (writes benchmarks/codecs.json)

Models: the bundled checkpoint and a baseline-size synthetic model (9 x 512, vocab 1024:
`checkpoints.synthetic_state_dict`). Codes: RTN, matrices int6 SDClip k = 12.85, the tied embedding int8 k = 20 (the
SDClip records' setting), tensors with <= 65,536 elements fp16/fp32 as the challenge does.
Per model: our artifact (fast writer, and exhaustive when not skipped) against the records' method over the same
codes (torch.save of the int8 codes + fp16 scales + passthrough tensors -> byte shuffle stride 2 -> brotli-11) and
against lzma-9 of the same torch.save blob; codes bytes against the order-0 entropy bound; the size model's error
(estimate / real - 1 for every codec x layout of every codes section; on the synthetic model for 8 sections);
decode speed of each codec in MB/s of decoded codes on the largest codes section.
"""
from __future__ import annotations

from pathlib import Path


import argparse
import io
import json
import lzma
import tempfile
import time

import brotli
import numpy as np
import torch

from golfquant.artifact import write_artifact
from golfquant.atomic import atomic_write_text
from golfquant.codec import BYTE_CODECS, compress, decompress
from golfquant.codec.entropy import order0_bits
from golfquant.codec.rans import decode_codes
from golfquant.codec.sizemodel import RANS, estimate_codes_section
from golfquant.plan import PlanOptions, make_plan
from golfquant.quant import QuantizedTensor
from golfquant.quant.rtn import quantize_rtn

from checkpoints import BUNDLED as CHECKPOINT, synthetic_state_dict

OUT = Path(__file__).with_suffix(".json")


def quantize(sd: dict) -> tuple[dict, dict]:
    plan = make_plan(sd, PlanOptions(mlp="int6", attn="int6", embed="int8", other="int6"))
    out = {}
    for name, tp in plan.items():
        if tp.bits is None:
            out[name] = sd[name].to(torch.float16) if tp.scheme == "fp16" else sd[name]
        else:
            out[name] = quantize_rtn(sd[name], tp.bits, "sdclip:20" if tp.role == "embed" else "sdclip:12.85")
    return out, plan


def records_blob(tensors: dict) -> bytes:
    """The records' container: torch.save of {name.q: int8, name.scale: fp16, passthrough} (brief §1.2)."""
    obj = {}
    for name, v in tensors.items():
        if isinstance(v, QuantizedTensor):
            obj[name + ".q"], obj[name + ".scale"] = v.codes, v.scales
        else:
            obj[name] = v
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def shuffle2(data: bytes) -> bytes:
    a = np.frombuffer(data[: len(data) // 2 * 2], np.uint8).reshape(-1, 2)
    return a[:, 0].tobytes() + a[:, 1].tobytes() + data[len(data) // 2 * 2:]


def size_model_errors(tensors: dict, limit: int | None) -> list[dict]:
    rows = []
    quant = [(n, v) for n, v in tensors.items() if isinstance(v, QuantizedTensor)]
    for name, qt in quant[:limit]:
        codes = qt.codes.numpy()
        est = estimate_codes_section(codes, qt.bits)
        for (codec, layout), e in est.bytes.items():
            real = len(est.rans_model.encode()) if codec == RANS else len(compress(est.streams[layout], codec))
            rows.append({"tensor": name, "bits": qt.bits, "codec": codec, "layout": layout, "estimate": e,
                         "real": real, "error": e / real - 1})
    return rows


def error_summary(rows: list[dict]) -> dict:
    out = {}
    for codec in dict.fromkeys(r["codec"] for r in rows):
        errs = np.array([r["error"] for r in rows if r["codec"] == codec and not (r["layout"] or "").startswith("planes")])
        if errs.size:
            out[codec] = {"median": float(np.median(errs)), "mean_abs": float(np.abs(errs).mean()),
                          "max_abs": float(np.abs(errs).max()), "n": int(errs.size)}
    best_pred = {}
    for r in rows:  # did the predicted best candidate of each section turn out to be the real best?
        best_pred.setdefault(r["tensor"], []).append(r)
    hits = sum(min(v, key=lambda r: r["estimate"])["real"] == min(r["real"] for r in v) for v in best_pred.values())
    top2 = sum(min(r["real"] for r in sorted(v, key=lambda r: r["estimate"])[:2]) == min(r["real"] for r in v)
               for v in best_pred.values())
    return {"by_codec (planes layouts excluded)": out, "sections": len(best_pred), "predicted_best_is_best": hits,
            "best_within_top2_predicted": top2}


def decode_speed(tensors: dict) -> dict:
    qt = max((v for v in tensors.values() if isinstance(v, QuantizedTensor)), key=lambda v: v.codes.numel())
    codes = qt.codes.numpy()
    est = estimate_codes_section(codes, qt.bits)
    raw = est.streams["int8"]
    out = {"section": list(codes.shape), "bits": qt.bits}
    for codec in BYTE_CODECS:
        blob = compress(raw, codec)
        start = time.perf_counter()
        decompress(blob, codec, len(raw))
        out[codec] = len(raw) / 1e6 / (time.perf_counter() - start)
    blob = est.rans_model.encode()
    start = time.perf_counter()
    decode_codes(blob, codes.shape, qt.bits)
    out[RANS] = codes.size / 1e6 / (time.perf_counter() - start)
    return out


def measure(label: str, sd: dict, exhaustive: bool, error_limit: int | None) -> dict:
    tensors, plan = quantize(sd)
    res: dict = {"model": label, "weights": sum(v.numel() for v in sd.values())}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("fast", "exhaustive") if exhaustive else ("fast",):
            start = time.perf_counter()
            info = write_artifact(Path(tmp) / f"{mode}.gqa", tensors, plan, {}, exhaustive=mode == "exhaustive")
            res[f"{mode}_seconds"] = round(time.perf_counter() - start, 2)
            res[f"{mode}_bytes"] = info.total_bytes
            if mode == "fast":
                res["codes_bytes"] = sum(s.length for s in info.sections if s.kind == "codes")
                res["chosen"] = {f"{s.codec}/{s.layout}" if s.layout else s.codec: 0 for s in info.sections}
                for s in info.sections:
                    res["chosen"][f"{s.codec}/{s.layout}" if s.layout else s.codec] += 1
    blob = records_blob(tensors)
    start = time.perf_counter()
    res["records_bytes"] = len(brotli.compress(shuffle2(blob), quality=11))
    res["records_seconds"] = round(time.perf_counter() - start, 2)
    res["lzma9_bytes"] = len(lzma.compress(blob, preset=9))
    res["ours_vs_records"] = res["fast_bytes"] / res["records_bytes"]
    res["ours_vs_lzma9"] = res["fast_bytes"] / res["lzma9_bytes"]
    res["order0_bytes"] = sum(order0_bits(v.codes.numpy()) / 8 for v in tensors.values()
                              if isinstance(v, QuantizedTensor))
    res["codes_vs_order0"] = res["codes_bytes"] / res["order0_bytes"] - 1
    res["size_model"] = error_summary(size_model_errors(tensors, error_limit))
    res["decode_MB_s"] = decode_speed(tensors)
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-exhaustive", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bundled = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["model"]
    results = [measure("bundled 4x320", bundled, not args.no_exhaustive, None),
               measure("baseline-like 9x512 synthetic", synthetic_state_dict(), not args.no_exhaustive, 8)]
    atomic_write_text(OUT, json.dumps({"results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
