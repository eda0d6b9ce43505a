"""Measure once: every free tensor at every candidate setting, with its bytes and its damage.

This is ExLlamaV2's measurement pass for this format. The budget search (golfquant.budget) solves on the table;
golfquant.cache keeps it next to the output, so a second `--budget` run, or a sweep over budgets, skips it.

Candidates of one matrix (`candidate_grid`), a set designed so that finer moves plug in as more entries:
* fp16: the tensor kept in float (every matrix is in the trade under a budget, small ones included);
* intB with SDClip k: B = 2..8; k = 2 (int2), 3, 4.24, 6 (int3), and 4, 5.66, 8, 11.3, 16 (int4..int8), the √2
  grid of clip ranges that holds every setting the measured allocations of benchmarks/sensitivity.py picked;
* the records' settings, int6 k = 12.85 (int8 k = 20 for an embedding), so that their recipe is a plan of the table;
* LQER rank 4 (the records' factors) on top of int3 k = 4.24 and int4..int6 k = 8 (2-D matrices only);
* with `--salient auto`, PR #1908's salient groups (by default the top group of 64 input columns at int8,
  golfquant.quant.salient) on top of the records' setting and int4, int5 k = 8, for 2-D matrices with a Hessian
  whose columns come in whole groups (three candidates: where the records' widths and the budget's usual picks are).
With a clip fixed by the user (`fixed_clip`), the widths with that clip (salient groups on int4..int6), and fp16.
With `--rotate hadamard` every integer candidate (salient ones included) is quantized in the rotated basis; with
`--rotate auto` each gets a rotated twin, so the solver buys the rotation per tensor where it pays.

Bytes: the order-0 entropy of the codes, the fp16 row scales, the LQER factors' and salient groups' codes and
scales; fp16 is two bytes per element. The coder lands within a few % of the entropy; the budget search prices
what it picks with the coder's own size model. Damage: golfquant.sensitivity, in nats per token, from the codes the
quantizer actually produces (GPTQ when calibrating, whose sweep gives the Hessian-weighted row errors the damage
needs: golfquant.quant.gptq); a tensor without a sensitivity signal is measured with a
forward pass per candidate (`plan_divergence`).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from golfquant.codec.sizemodel import order0_bytes
from golfquant.distributed import collective, my_items
from golfquant.plan import cast_to_scheme
from golfquant.quant.clip import ClipSpec, parse_clip, record_k
from golfquant.quant.lqer import LqerOptions
from golfquant.quant.qtensor import MAX_BITS, MIN_BITS, QuantizedTensor, Rotation
from golfquant.quant.quantize import Quantizer, Setting
from golfquant.quant.rotate import SEED
from golfquant.quant.salient import SalientOptions

VERSION = 8  # of the measurement's meaning: bump when candidates, pricing or damage change
FLOAT_SCHEME = "fp16"
NARROW_K = {2: (2.0,), 3: (3.0, 4.243, 6.0)}
WIDE_K = (4.0, 5.657, 8.0, 11.31, 16.0)  # int4..int8
RECORD_WIDTH = {"embed": 8, "default": 6}  # the 04-05 SDClip record: int8 embeddings, int6 matrices
LQER_AT = ((3, 4.243), (4, 8.0), (5, 8.0), (6, 8.0))
RECORD_LQER = LqerOptions(rank=4)
SALIENT_AT = ((4, 8.0), (5, 8.0))  # and the records' setting


def sdclip(k: float) -> ClipSpec:
    return ClipSpec("sdclip", k=(("default", k),))


@dataclass(frozen=True)
class Candidate:
    """One way to store a tensor: fp16 (bits None), or intB codes at `clip`, optionally with an LQER correction
    and salient column groups, optionally in a Hadamard-rotated basis of `rotate` columns per block (None: not
    rotated)."""

    bits: int | None
    clip: ClipSpec | None = None
    lqer: LqerOptions | None = None
    salient: SalientOptions | None = None
    rotate: int | None = None

    @property
    def key(self) -> str:
        if self.bits is None:
            return FLOAT_SCHEME
        sal = self.salient
        return (f"int{self.bits} {self.clip}" + (f" +lqer{self.lqer.rank}" if self.lqer else "")
                + (f" +salient{sal.top}x{sal.group}@int{sal.bits}" if sal else "")
                + (f" +had{self.rotate}" if self.rotate else ""))

    @property
    def scheme(self) -> str:
        return FLOAT_SCHEME if self.bits is None else f"int{self.bits}"

    @property
    def rotation(self) -> Rotation | None:
        return None if self.rotate is None else Rotation(self.rotate, SEED)

    @property
    def setting(self) -> Setting:
        """What the quantizer makes of an integer candidate in its basis (the rotation is applied around it)."""
        return Setting(self.bits, self.clip, self.lqer, self.salient)

    def to_json(self) -> dict:
        sal = self.salient
        return {"bits": self.bits, "clip": None if self.clip is None else str(self.clip),
                "lqer": None if self.lqer is None else self.lqer.rank,
                "salient": None if sal is None else [sal.top, sal.group, sal.bits], "rotate": self.rotate}

    @classmethod
    def from_json(cls, d: dict) -> "Candidate":
        clip = None if d["clip"] is None else parse_clip(d["clip"])
        return cls(d["bits"], clip, None if d["lqer"] is None else LqerOptions(rank=d["lqer"]),
                   None if d["salient"] is None else SalientOptions(*d["salient"]), d["rotate"])


def record_candidate(role: str) -> Candidate:
    """The records' setting for a tensor of `role`: its width, and the records' SDClip k at that width."""
    key = role if role in RECORD_WIDTH else "default"
    return Candidate(RECORD_WIDTH[key], sdclip(record_k(key, RECORD_WIDTH[key])))


def candidate_grid(role: str, ndim: int, fixed_clip: ClipSpec | None = None, salient: SalientOptions | None = None,
                   rotate: int | None = None, twins: bool = False) -> list[Candidate]:
    """The candidates of one tensor (module docstring), in a fixed order: fp16 first. salient: the groups its
    salient candidates get (`--salient auto`, for a tensor that can hold them: salient_fits). rotate: the block of
    its rotation, which every integer candidate (salient ones included) gets, or with `twins` a rotated twin after
    the unrotated ones."""
    if fixed_clip is not None:
        out = [Candidate(None)] + [Candidate(b, fixed_clip) for b in range(MIN_BITS, MAX_BITS + 1)]
        salient_at = [(b, fixed_clip) for b in (4, 5, 6)]
    else:
        out = [Candidate(None)]
        for bits in range(MIN_BITS, MAX_BITS + 1):
            out += [Candidate(bits, sdclip(k)) for k in NARROW_K.get(bits, WIDE_K)]
        record = record_candidate(role)
        if record not in out:
            out.append(record)
        if ndim == 2:
            out += [Candidate(bits, sdclip(k), RECORD_LQER) for bits, k in LQER_AT]
        salient_at = [(b, sdclip(k)) for b, k in SALIENT_AT] + [(record.bits, record.clip)]
    if salient is not None:
        applied = dataclasses.replace(salient, auto=False)
        out += [Candidate(bits, clip, salient=applied) for bits, clip in salient_at if bits < applied.bits]
    if rotate is None:
        return out
    rotated = [dataclasses.replace(c, rotate=rotate) for c in out if c.bits is not None]
    return out + rotated if twins else out[:1] + rotated


def salient_fits(w: torch.Tensor, hessian: torch.Tensor | None, salient: SalientOptions) -> bool:
    """Whether the grid of w offers `salient`'s groups: a 2-D matrix that can hold them at int6."""
    return salient.top > 0 and w.dim() == 2 and salient.unfit(tuple(w.shape), 6, hessian) is None


@dataclass
class Measured:
    """One row of the table: a candidate, its estimated bytes and its damage (nats per token)."""

    candidate: Candidate
    bytes: float
    damage: float


def rotation_groups(cands: list[Candidate]) -> dict[Rotation | None, list[Candidate]]:
    """The integer candidates by rotation, in order: those of one rotation share the GPTQ factorisation of the
    Hessian in its basis, and its sweeps (Quantizer.many)."""
    groups: dict[Rotation | None, list[Candidate]] = {}
    for c in cands:
        if c.bits is not None:
            groups.setdefault(c.rotation, []).append(c)
    return groups


def stored_values(w: torch.Tensor, cands: list[Candidate], role: str, hessian: torch.Tensor | None,
                  quantizer: Quantizer) -> list[tuple[QuantizedTensor | torch.Tensor, torch.Tensor | None]]:
    """The value the artifact holds for w under each candidate (a QuantizedTensor, or the fp16 tensor) and, where
    a GPTQ sweep made it, its row errors diag((W - Ŵ) H (W - Ŵ)ᵀ). The candidates of one rotation share the GPTQ
    factorisation of the Hessian and its sweeps, and an LQER candidate the codes of its base (Quantizer.many: the
    values of separate calls)."""
    got: dict[Candidate, tuple[QuantizedTensor | torch.Tensor, torch.Tensor | None]] = {
        c: (cast_to_scheme(w, FLOAT_SCHEME), None) for c in cands if c.bits is None}
    for rotation, group in rotation_groups(cands).items():
        values = quantizer.many(w, [c.setting for c in group], role, hessian, quantizer.prepare(hessian, rotation),
                                errors=False, rotation=rotation)
        got.update((c, (qt, stats and stats.row_errors)) for c, (qt, stats) in zip(group, values))
    return [got[c] for c in cands]


def stored_bytes(value: QuantizedTensor | torch.Tensor, codes_bytes: Callable[[torch.Tensor, int], float]) -> float:
    """What a stored value adds to an artifact before the shared sections' compression: its codes, priced by
    codes_bytes(codes, bits), and the raw bytes of its scales, LQER factors and salient groups included; a float
    tensor's raw bytes."""
    if not isinstance(value, QuantizedTensor):
        return float(value.numel() * value.element_size())
    parts = [(value.codes, value.bits, value.scales)]
    if value.lqer is not None:
        lq = value.lqer
        parts += [(lq.a_codes, lq.a_bits, lq.a_scale), (lq.b_codes, lq.b_bits, lq.b_scales)]
    if value.salient is not None:
        parts.append((value.salient.codes, value.salient.bits, value.salient.scales))
    return sum(codes_bytes(codes, bits) + scales.numel() * scales.element_size() for codes, bits, scales in parts)


def entropy_bytes(value: QuantizedTensor | torch.Tensor) -> float:
    """The table's bytes of a stored value: its codes at their order-0 entropy."""
    return stored_bytes(value, lambda codes, bits: order0_bytes(codes.numpy()))


def dequantized(value: QuantizedTensor | torch.Tensor) -> torch.Tensor:
    return value.dequantize() if isinstance(value, QuantizedTensor) else value.float()


@dataclass
class MeasurementInfo:
    signal: str  # how damage was measured: "fisher" (golfquant.sensitivity)
    heldout_tokens: int
    seconds: float = 0.0
    candidates: int = 0  # tensor x candidate pairs
    cached: bool = False  # read from the cache rather than measured by this run


@dataclass
class Measurement:
    key: str
    tensors: dict[str, list[Measured]]
    info: MeasurementInfo

    def to_json(self) -> dict:
        return {"version": VERSION, "key": self.key, "info": dataclasses.asdict(self.info),
                "tensors": {n: [{"candidate": m.candidate.to_json(), "bytes": m.bytes, "damage": m.damage}
                                for m in rows] for n, rows in self.tensors.items()}}

    @classmethod
    def from_json(cls, doc: dict) -> "Measurement":
        """ValueError, KeyError or TypeError when malformed or of another VERSION."""
        if doc.get("version") != VERSION:
            raise ValueError(f"measurement version {doc.get('version')!r}, not {VERSION}")
        tensors = {n: [Measured(Candidate.from_json(r["candidate"]), float(r["bytes"]), float(r["damage"]))
                       for r in rows] for n, rows in doc["tensors"].items()}
        return cls(str(doc["key"]), tensors, MeasurementInfo(**doc["info"]))


# (name, w, w_hat, the row errors diag((w - w_hat) H (w - w_hat)ᵀ) when known) -> nats per token
Damage = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor | None], float]


def measure(state_dict: Mapping[str, torch.Tensor], grids: Mapping[str, list[Candidate]], roles: Mapping[str, str],
            hessians: Mapping[str, torch.Tensor | None], quantizer: Quantizer, damage: Damage, key: str,
            info: MeasurementInfo, progress: Callable[[int, int], None] | None = None) -> Measurement:
    """The table for the tensors of `grids`: each candidate's stored value (stored_values) priced and its damage
    measured."""
    start = time.perf_counter()
    names = list(grids)

    def my_share() -> dict[str, list[Measured]]:
        # Under torchrun each process measures a share of the tensors, the largest first; all get every row.
        mine = my_items(names, [state_dict[n].numel() for n in names])
        return _measure_tensors(state_dict, {n: grids[n] for n in mine}, roles, hessians, quantizer, damage, progress)

    rows = {k: v for part in collective(my_share) for k, v in part.items()}
    info = dataclasses.replace(info, seconds=round(time.perf_counter() - start, 2),
                               candidates=sum(len(g) for g in grids.values()), cached=False)
    return Measurement(key, {n: rows[n] for n in names}, info)


def _measure_tensors(state_dict: Mapping[str, torch.Tensor], grids: Mapping[str, list[Candidate]],
                     roles: Mapping[str, str], hessians: Mapping[str, torch.Tensor | None], quantizer: Quantizer,
                     damage: Damage, progress: Callable[[int, int], None] | None) -> dict[str, list[Measured]]:
    tensors: dict[str, list[Measured]] = {}
    total, done = sum(len(g) for g in grids.values()), 0
    for name, grid in grids.items():
        w = state_dict[name].float()
        rows = []
        for cand, (value, row_errors) in zip(grid, stored_values(w, grid, roles[name], hessians.get(name),
                                                                 quantizer)):
            rows.append(Measured(cand, entropy_bytes(value), damage(name, w, dequantized(value), row_errors)))
            done += 1
            if progress is not None:
                progress(done, total)
        tensors[name] = rows
    return tensors
