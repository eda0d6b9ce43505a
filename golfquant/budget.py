"""`--budget B`: the best artifact golfquant can make in B bytes (artifact + code), chosen by measured damage.

Measure, solve, confirm, fit (ExLlamaV2's measure -> optimize, plus a check of the answer):
1. Calibrate: Hessians, and held-out tokens the Hessians never saw. Cached next to the output.
2. Measure (golfquant.measure): every free tensor at every candidate, its bytes and its damage. Cached next to the
   output, keyed by the checkpoint and the options, so a second run on the same inputs, or a sweep, skips it.
3. Plans at the budget, each solved on the table, priced with the coder's own size model and solved again until
   it fits:
   * `allocated`: the knapsack solution (golfquant.quant.allocate);
   * `records`: the records' recipe (int6 k=12.85, embeddings int8 k=20, tensors of <= 65,536 elements fp16)
     when it fits, its leftover spent greedily;
   * `uniform intB`, B = 5..8: every free tensor at intB with the least-damage k of the grid that fits, its
     leftover spent greedily.
4. Confirm: the KL of each plan with all its tensors quantized at once, measured on the held-out tokens; the
   least wins, so `--budget` is never worse than those plans on the tokens it measured.
5. Encode in memory; when the real bytes miss the budget (the size model does not see how the manifest, scales
   and float tensors compress), the chosen plan is solved again for the corrected room; pruning ±1 codes is the
   last resort. The caller writes the file, once.

With `prune_to_budget` the plan's own widths are kept and only pruning fits it. With `--rotate hadamard` every
integer candidate (and every fixed tensor) is rotated; with `--rotate auto` the free tensors' candidates come in
pairs, plain and rotated (golfquant.measure), and the fixed tensors are not rotated.

One module, one state (`_Run`): every step reads and extends the same memo of quantized values and their exact
prices, so that each candidate is quantized and priced once whichever plan asks for it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from golfquant.artifact import EncodedArtifact, encode_artifact, float_tensor_bytes
from golfquant.cache import (CALIBRATION_VERSION, cache_key, cache_paths, load_calibration, load_measurement,
                             save_calibration, save_measurement, state_dict_digest)
from golfquant.calib import heldout_tokens
from golfquant.checkpoint import Checkpoint
from golfquant.codec.rans import estimate_encoded_bytes
from golfquant.codec.sizemodel import ScaledEntropyPricer
from golfquant.distributed import on_main
from golfquant.errors import OptionError
from golfquant.measure import (WIDE_K, Candidate, Measured, Measurement, MeasurementInfo, candidate_grid, dequantized,
                               measure, record_candidate, rotation_groups, salient_fits, sdclip, stored_bytes)
from golfquant.options import QuantizeOptions
from golfquant.pipeline import (Calibration, Progress, Quantized, TensorReport, build_float_model, calibrate,
                                clip_k_meta, gptq_meta, hessian_of, quantize_tensor_many, stage)
from golfquant.plan import TensorPlan, cast_to_scheme, make_plan
from golfquant.quant import QuantizedTensor
from golfquant.quant.allocate import Choice, allocate, fill, smallest, total_bytes, total_damage
from golfquant.quant.gptq import PreparedHessian
from golfquant.quant.prune import prune_costs, prune_to_bytes, pruned_floor
from golfquant.quant.qtensor import Rotation
from golfquant.quant.rotate import rotate_hessian, rotation_for
from golfquant.sensitivity import measure_sensitivity, plan_divergence, reference_logprobs

BUDGET_TOLERANCE = 0.005  # the artifact lands in [(1 - this)·B, B] when the candidates' steps allow it
UNIFORM_WIDTHS = (5, 6, 7, 8)
RECORD_FLOAT_MAX_NUMEL = 65536  # the records keep tensors this small in fp16
_SOLVE_ROUNDS = 4  # solve -> price exactly, per plan
_FIT_ROUNDS = 4  # encode -> correct the room
_PRUNE_ROUNDS = 4  # prune -> encode confirmations
_HEADER_GUESS = 2048  # bytes of header and manifest before the first encode
_MANIFEST_PER_TENSOR = 160
_SMALLEST_PRICED = 3  # candidates per tensor priced exactly to find the smallest artifact (estimates rank them)


@dataclass
class PlanRow:
    """One line of the confirmation: a plan at the budget, its priced bytes, predicted and measured KL."""

    plan: str
    total_bytes: int | None  # artifact (size model) + code; None: the plan does not fit
    predicted_kl: float | None  # sum of the measured per-tensor damages, nats per token
    measured_kl: float | None  # all tensors quantized at once, on the held-out tokens
    chosen: bool = False


@dataclass
class Allocation:
    name: str
    role: str
    scheme: str
    setting: str  # the candidate's key: "int6 sdclip:default=8.0", "fp16", "... +lqer4"
    free: bool  # False: fixed by --mlp/--attn/--embed/--other/--rule, or by the float-size convention


@dataclass
class BudgetReport:
    """What the budget search chose and why: the storage of every matrix, the plans it measured at the budget,
    how the measurement was made, and where the time went."""

    budget: int
    code_bytes: int
    allocation: list[Allocation]
    plans: list[PlanRow]
    chosen: str | None  # None with prune_to_budget
    measurement: MeasurementInfo | None  # None with prune_to_budget
    pruned_codes: int
    encodes: int
    seconds: dict[str, float]  # wall time per stage: calibration, sensitivity, measurement, solve, confirm, encode


@dataclass
class _Priced:
    bytes: float
    damage: float


def quantize_to_budget(ckpt: Checkpoint, opts: QuantizeOptions, code_bytes: int, extra_meta: dict,
                       cache: Path | None = None, progress: Progress | None = None,
                       calibration: Calibration | None = None, measurement: Measurement | None = None,
                       model: torch.nn.Module | None = None) -> tuple[Quantized, EncodedArtifact, BudgetReport]:
    """The artifact (in memory) with artifact + code bytes <= opts.budget (module docstring). `cache`: the stem
    of the cache files (golfquant.cache.cache_paths); `calibration` / `measurement`: reuse these (a sweep);
    `model`: the float model of ckpt when the caller holds it."""
    room = opts.budget - code_bytes
    if room <= 0:
        raise OptionError(f"budget {opts.budget:,} bytes is used up by the {code_bytes:,} code bytes alone")
    run = _Run(ckpt, opts, room, extra_meta, progress, model)
    with run.timed("calibration"):
        run.calibration = calibration or run.calibrate(cache, heldout=not opts.prune_to_budget)
        if not opts.prune_to_budget and run.calibration.heldout is None:
            run.calibration.heldout = run.heldout()
    if opts.prune_to_budget:
        encoded = run.fit_fixed()
    else:
        run.measurement = measurement or run.measure(cache)
        encoded = run.fit_allocated()
    report = BudgetReport(opts.budget, code_bytes, run.allocation(), run.rows, run.chosen,
                          run.measurement.info if run.measurement else None, run.pruned, run.encodes,
                          {k: round(v, 2) for k, v in run.seconds.items()})
    return run.result(), encoded, report


class _Run:
    """State of one budgeted quantization: the plan, calibration, measurement, and every value quantized so far."""

    def __init__(self, ckpt: Checkpoint, opts: QuantizeOptions, room: int, extra_meta: dict,
                 progress: Progress | None, model: torch.nn.Module | None):
        self.ckpt, self.sd, self.opts, self.spec, self.room = ckpt, ckpt.state_dict, opts, opts.clip, room
        self.progress, self.extra_meta = progress, extra_meta
        convention = opts.plan.float_max_numel if opts.fixed_float or opts.prune_to_budget else 0
        self.plan = make_plan(self.sd, dataclasses.replace(opts.plan, float_max_numel=convention))
        rules = [re.compile(regex) for regex, _ in opts.plan.rules]
        quantized = [n for n, tp in self.plan.items() if tp.bits is not None]
        self.free = [] if opts.prune_to_budget else [
            n for n in quantized if self.plan[n].role not in opts.fixed_roles and not any(p.search(n) for p in rules)]
        self.fixed = [n for n in quantized if n not in self.free]
        # the rotation of each quantized tensor's rotated candidates (under `auto`: of its twins)
        rotate = "hadamard" if opts.rotate == "auto" else opts.rotate
        self.rotation = {n: rotation_for(rotate, n, self.sd[n].shape[-1]) for n in quantized}
        self.calibration: Calibration | None = None
        self.measurement: Measurement | None = None
        self._model = model
        self._reference: list[torch.Tensor] | None = None
        self.values: dict[tuple[str, str], tuple[QuantizedTensor | torch.Tensor, TensorReport | None]] = {}
        self.exact: dict[tuple[str, str], float] = {}
        # GPTQ factorisations by Hessian (c_q, c_k and c_v share one object, as in the calibration cache) and rotation
        self._prepared: dict[tuple[int, Rotation | None], list[PreparedHessian] | None] = {}
        self.choice: dict[str, Candidate] = {}
        self.confirmed: dict[str, Candidate] = {}  # the plan the confirmation chose, before fitting
        self.override: dict[str, QuantizedTensor] = {}  # pruned tensors
        self.rows: list[PlanRow] = []
        self.chosen: str | None = None
        self.pruned = 0
        self.encodes = 0
        self.encoded_plan: str | None = None  # self.chosen when the last encode ran
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, stage_name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage_name] = self.seconds.get(stage_name, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------------------------------ calibration

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            # the state dict's own tensors where they fit (a copy costs 4 bytes a parameter): the search never
            # writes them (plan_divergence swaps other tensors in and back out)
            self._model = build_float_model(self.ckpt, self.opts, share=True)
        return self._model

    @functools.cached_property
    def digest(self) -> str:
        return state_dict_digest(self.sd)

    def _model_key(self) -> dict:
        return {"config": self.ckpt.config, "spec": self.opts.model_spec, "args": self.opts.model_args,
                "heads": self.opts.num_heads}

    def calibrate(self, cache: Path | None, heldout: bool) -> Calibration:
        if not (self.opts.needs_hessians and self.plan):
            return Calibration({}, {})
        path = cache_paths(cache)[0] if cache is not None and heldout else None
        key = cache_key(self.digest, {"calib": dataclasses.asdict(self.opts.calib), "model": self._model_key()},
                        CALIBRATION_VERSION)
        if path is not None:
            cached = on_main(lambda: load_calibration(path, key))
            if cached is not None:
                return cached
        calibration = calibrate(self.ckpt, self.opts, self.progress, self.plan, self.model, heldout=heldout)
        if path is not None:
            on_main(lambda: save_calibration(path, key, calibration))
        return calibration

    def heldout(self) -> torch.Tensor:
        return heldout_tokens(self.model, self.opts.calib, stage(self.progress, "held-out tokens"))

    # ---------------------------------------------------------------------------------------------- measure

    def grids(self) -> dict[str, list[Candidate]]:
        fixed_clip = self.spec if self.opts.fixed_clip else None
        hessians = self.calibration.hessians
        salient = self.opts.salient if self.opts.salient.auto else None
        return {n: candidate_grid(self.plan[n].role, self.sd[n].dim(), fixed_clip,
                                  salient if salient and salient_fits(self.sd[n], hessian_of(hessians, n), salient)
                                  else None,
                                  self.rotation[n] and self.rotation[n].block, self.opts.rotate == "auto")
                for n in self.free}

    def measure(self, cache: Path | None) -> Measurement:
        grids = self.grids()
        options = {"calib": dataclasses.asdict(self.opts.calib), "model": self._model_key(),
                   "quantizer": dataclasses.asdict(self.opts.quantizer),
                   "grids": {n: [c.key for c in g] for n, g in grids.items()}}
        key = cache_key(self.digest, options)
        path = cache_paths(cache)[1] if cache is not None else None
        if path is not None:
            cached = on_main(lambda: load_measurement(path, key))
            if cached is not None:
                return cached
        hessians = self.calibration.hessians
        held = self.calibration.heldout
        with self.timed("sensitivity"):
            sens = measure_sensitivity(self.model, held, hessians, progress=stage(self.progress, "sensitivity"))

        def damage(name: str, w: torch.Tensor, w_hat: torch.Tensor, row_errors: torch.Tensor | None) -> float:
            d = sens.damage(name, w, w_hat, row_errors)
            return d if d is not None else self.kl({name: w_hat})

        roles = {n: self.plan[n].role for n in grids}
        info = MeasurementInfo("fisher", int(held.numel()))
        with self.timed("measurement"):
            m = measure(self.sd, grids, roles, {n: hessian_of(hessians, n) for n in grids}, self.opts.quantizer,
                        damage, key, info, stage(self.progress, "measure"))
        if path is not None:
            on_main(lambda: save_measurement(path, m))
        return m

    def kl(self, weights: dict[str, torch.Tensor]) -> float:
        held = self.calibration.heldout
        if self._reference is None:
            self._reference = reference_logprobs(self.model, held)
        return plan_divergence(self.model, weights, held, self._reference).kl

    # ---------------------------------------------------------------------------------------------- values

    def value(self, name: str, cand: Candidate) -> QuantizedTensor | torch.Tensor:
        self.quantize({name: [cand]})
        return self.values[(name, cand.key)][0]

    def quantize(self, wanted: dict[str, list[Candidate]]) -> None:
        """Quantize (into self.values) the wanted candidates not yet held, those of one tensor and rotation with
        shared GPTQ sweeps and factorisation."""
        for name, cands in wanted.items():
            todo = [c for c in dict.fromkeys(cands) if (name, c.key) not in self.values]
            for c in todo:
                if c.bits is None:
                    self.values[(name, c.key)] = (cast_to_scheme(self.sd[name], c.scheme), None)
            h = hessian_of(self.calibration.hessians, name)
            for rotation, group in rotation_groups(todo).items():
                if (id(h), rotation) not in self._prepared:
                    self._prepared[(id(h), rotation)] = self.opts.quantizer.prepare(h, rotation)
                got = quantize_tensor_many(self.sd[name], self.plan[name], [c.setting for c in group], h, self.opts,
                                           rotation, self._prepared[(id(h), rotation)])
                self.values.update(((name, c.key), v) for c, v in zip(group, got))

    def exact_bytes(self, name: str, cand: Candidate) -> float:
        """The candidate's bytes with its codes priced by the coder's own size model, a float tensor compressed."""
        key = (name, cand.key)
        if key not in self.exact:
            value = self.value(name, cand)
            self.exact[key] = float(float_tensor_bytes(value, self.opts.exhaustive)) if cand.bits is None else \
                stored_bytes(value, lambda codes, bits: estimate_encoded_bytes(codes.numpy(), bits))
        return self.exact[key]

    # -------------------------------------------------------------------------------------------- solving

    def table(self) -> dict[str, list[_Priced]]:
        """The measured table with every candidate's bytes corrected: exact where priced, else its entropy
        estimate times the exact/estimate ratio of the same tensor's nearest priced candidate."""
        out = {}
        for name, rows in self.measurement.tensors.items():
            priced = [(m, self.exact[(name, m.candidate.key)]) for m in rows if (name, m.candidate.key) in self.exact]
            out[name] = [_Priced(self._corrected(name, m, priced), m.damage) for m in rows]
        return out

    @staticmethod
    def _corrected(name: str, m: Measured, priced: list[tuple[Measured, float]]) -> float:
        exact = [b for p, b in priced if p.candidate.key == m.candidate.key]
        if exact:
            return exact[0]
        same = [(p, b) for p, b in priced if p.candidate.bits == m.candidate.bits and p.bytes > 0]
        pool = same or [(p, b) for p, b in priced if p.candidate.bits is not None and p.bytes > 0]
        if m.candidate.bits is None or not pool:
            return m.bytes
        p, b = min(pool, key=lambda pb: abs(pb[0].bytes - m.bytes))
        return m.bytes * b / p.bytes

    def families(self) -> list[str]:
        return ["allocated"] + ([] if self.opts.fixed_clip else ["records"]) + [f"uniform int{b}" for b in UNIFORM_WIDTHS]

    def plan_family(self, family: str, table: dict[str, list[_Priced]], room: float) -> Choice | None:
        """The family's plan for `room` bytes on `table` (module docstring); None when it does not fit."""
        if family == "allocated":
            return allocate(table, room)
        index = {n: {m.candidate: i for i, m in enumerate(ms)} for n, ms in self.measurement.tensors.items()}
        if family == "records":
            starts = [{n: ix[Candidate(None) if self.sd[n].numel() <= RECORD_FLOAT_MAX_NUMEL
                              else self.as_planned(n, record_candidate(self.plan[n].role))] for n, ix in index.items()}]
        else:
            bits = int(family.removeprefix("uniform int"))
            clips = [self.spec] if self.opts.fixed_clip else [sdclip(k) for k in WIDE_K]
            starts = [{n: ix[self.as_planned(n, Candidate(bits, c))] for n, ix in index.items()} for c in clips]
        fits = [s for s in starts if total_bytes(table, s) <= room]
        return fill(table, min(fits, key=lambda s: total_damage(table, s)), room) if fits else None

    def solve(self, family: str, room: float) -> Choice | None:
        """The family's plan for `room`, every candidate it uses priced exactly, solved again until it fits."""
        with self.timed("solve"):
            return self._solve(family, room)

    def _solve(self, family: str, room: float) -> Choice | None:
        for _ in range(_SOLVE_ROUNDS):
            choice = self.plan_family(family, self.table(), room)
            if choice is None:
                return None
            if sum(self.exact_bytes(n, self._cand(n, i)) for n, i in choice.items()) <= room:
                return choice
        return None

    def _cand(self, name: str, i: int) -> Candidate:
        return self.measurement.tensors[name][i].candidate

    def as_planned(self, name: str, cand: Candidate) -> Candidate:
        """An integer candidate as the plans without choice store it: rotated under --rotate hadamard (under auto
        the records' and uniform plans stay plain, as the fixed tensors do)."""
        rot = self.rotation.get(name)
        return dataclasses.replace(cand, rotate=rot.block) if rot and self.opts.rotate != "auto" else cand

    def fixed_candidate(self, name: str) -> Candidate:
        return self.as_planned(name, Candidate(self.plan[name].bits, self.spec))

    # ------------------------------------------------------------------------------------------ the search

    def fit_allocated(self) -> EncodedArtifact:
        # Every plan is solved for the room left by a guess of what the size model does not see (manifest,
        # compression of the shared sections); encoding the chosen plan measures it, and the plan is solved again
        # for the real room when the artifact misses the budget.
        overhead, least, encoded = self._overhead_guess(), None, None
        # the values the families' plans start from, in shared sweeps (solving prices them one by one)
        with self.timed("solve"):
            table = self.table()
            starts = [self.plan_family(f, table, self.room - overhead) for f in self.families()]
            self.quantize({n: [self._cand(n, c[n]) for c in starts if c] for n in self.measurement.tensors})
        if self.solve("allocated", self.room - overhead) is None:
            # priced exactly: each tensor's few smallest by the table, where the smallest of all lies
            table = {}
            for n, ms in self.measurement.tensors.items():
                few = sorted(range(len(ms)), key=lambda i: (ms[i].bytes, i))[:_SMALLEST_PRICED]
                table[n] = [_Priced(self.exact_bytes(n, m.candidate) if i in few else math.inf, m.damage)
                            for i, m in enumerate(ms)]
            least = smallest(table)
            encoded = self._encode_choice(least)
            if encoded.info.total_bytes > self.room:
                raise OptionError(f"budget {self.opts.budget:,} bytes cannot be met: the smallest reachable artifact "
                                  f"is {encoded.info.total_bytes:,} bytes + {self.opts.budget - self.room:,} code "
                                  "bytes; raise the budget, or free the widths fixed by --mlp/--attn/--embed/--other/"
                                  "--rule")
            overhead = encoded.info.total_bytes - self._free_bytes()
        choices = {f: self.solve(f, self.room - overhead) for f in self.families()}
        # the plans are solved: a refit prices few new values, and the factorisations (one H⁻¹ per tensor) would
        # otherwise stay held through the confirmation's forward passes
        self._prepared.clear()
        with self.timed("confirm"):
            self._confirm(choices, overhead)
        if self.chosen is None:  # the smallest plan fits, but none of the families' plans did
            choices["allocated"] = least
            self.chosen = "allocated"
            for row in self.rows:
                row.chosen = row.plan == "allocated"
        choice = choices[self.chosen]
        self.confirmed = {n: self._cand(n, i) for n, i in choice.items()}
        while True:
            # encode a new choice, or again for the manifest to name the plan (an encode of the smallest plan
            # came before the plans)
            if encoded is None or {n: self._cand(n, i) for n, i in choice.items()} != self.choice \
                    or self.encoded_plan != self.chosen:
                encoded = self._encode_choice(choice)
            real = encoded.info.total_bytes
            if (1 - BUDGET_TOLERANCE) * self.room <= real <= self.room or self.encodes >= _FIT_ROUNDS:
                break
            refit = self.solve(self.chosen, self.room - (real - self._free_bytes()))
            if refit is None or refit == choice:
                break
            choice = refit
        if encoded.info.total_bytes > self.room:
            encoded = self._prune(encoded)
        self._report_final(encoded)
        return encoded

    def _report_final(self, encoded: EncodedArtifact) -> None:
        """The chosen row describes the artifact itself: its real bytes and, when fitting changed the plan (a
        re-solve for the real overhead, or pruning), the KL measured again."""
        row = next(r for r in self.rows if r.chosen)
        row.total_bytes = encoded.info.total_bytes + self.opts.budget - self.room
        if self.choice != self.confirmed or self.override:
            tensors, _ = self.tensors()
            with self.timed("confirm"):
                row.measured_kl = self.kl({n: dequantized(tensors[n]) for n in self.choice})
            table = self.measurement.tensors
            row.predicted_kl = sum(next(m.damage for m in table[n] if m.candidate == c) for n, c in self.choice.items())

    def _encode_choice(self, choice: Choice) -> EncodedArtifact:
        self.choice = {n: self._cand(n, i) for n, i in choice.items()}
        return self.encode()

    def _free_bytes(self) -> float:
        return sum(self.exact_bytes(n, c) for n, c in self.choice.items())

    def _confirm(self, choices: dict[str, Choice | None], overhead: float) -> None:
        measured = {}
        for i, (family, choice) in enumerate(choices.items()):
            if self.progress:
                self.progress("confirm", i, len(choices))
            if choice is None:
                self.rows.append(PlanRow(family, None, None, None))
                continue
            weights = {n: dequantized(self.value(n, self._cand(n, j))) for n, j in choice.items()}
            measured[family] = self.kl(weights)
            table = self.measurement.tensors
            predicted = sum(table[n][j].damage for n, j in choice.items())
            priced = sum(self.exact_bytes(n, self._cand(n, j)) for n, j in choice.items())
            self.rows.append(PlanRow(family, round(priced + overhead + self.opts.budget - self.room), predicted,
                                     measured[family]))
        if measured:
            self.chosen = min(measured, key=lambda f: (measured[f], list(choices).index(f)))
            for row in self.rows:
                row.chosen = row.plan == self.chosen

    def _fixed_bytes(self) -> float:
        return sum(self.exact_bytes(n, self.fixed_candidate(n)) for n in self.fixed)

    def _overhead_guess(self) -> float:
        # compressed one by one: the data section holds them together, and compresses them a little better
        floats = sum(float_tensor_bytes(cast_to_scheme(self.sd[n], tp.scheme), self.opts.exhaustive)
                     for n, tp in self.plan.items() if tp.bits is None)
        return _HEADER_GUESS + _MANIFEST_PER_TENSOR * len(self.plan) + floats + self._fixed_bytes()

    def fit_fixed(self) -> EncodedArtifact:
        """prune_to_budget: the plan as it is, pruned until it fits."""
        encoded = self.encode()
        if encoded.info.total_bytes > self.room:
            encoded = self._prune(encoded)
        return encoded

    # ------------------------------------------------------------------------------------------- encoding

    def tensors(self) -> tuple[dict, dict[str, TensorPlan]]:
        tensors, plan = {}, {}
        for name, tp in self.plan.items():
            if name in self.choice:
                cand = self.choice[name]
                tensors[name] = self.value(name, cand)
                plan[name] = dataclasses.replace(tp, scheme=cand.scheme, bits=cand.bits)
            elif tp.bits is not None:
                tensors[name] = self.value(name, self.fixed_candidate(name))
                plan[name] = tp
            else:
                tensors[name] = cast_to_scheme(self.sd[name], tp.scheme)
                plan[name] = tp
        return tensors | self.override, plan

    def reports(self) -> list[TensorReport]:
        out = []
        for name, tp in self.plan.items():
            cand = self.choice.get(name) or (self.fixed_candidate(name) if tp.bits is not None else None)
            if cand is not None and cand.bits is not None:
                self.value(name, cand)
                out.append(self.values[(name, cand.key)][1])
        return out

    def meta(self) -> dict:
        meta = {"method": self.opts.method, "clip": str(self.spec), "budget": self.opts.budget,
                "pruned_codes": self.pruned} | ({"rotate": self.opts.rotate} if self.opts.rotate != "none" else {})
        if self.calibration is not None and self.calibration.info:
            meta["calibration"] = self.calibration.info
        if self.chosen is not None:
            meta["plan"] = self.chosen
            meta["allocation"] = {n: c.key for n, c in self.choice.items()}
        gptq_meta(meta, self.reports(), self.opts)
        clip_k_meta(meta, self.spec, [self.plan[n] for n in self.fixed])
        return meta

    def encode(self) -> EncodedArtifact:
        tensors, plan = self.tensors()
        if self.progress:
            self.progress("encode", 0, 1)
        with self.timed("encode"):
            encoded = encode_artifact(tensors, plan, self.meta() | self.extra_meta, exhaustive=self.opts.exhaustive)
        self.encodes += 1
        self.encoded_plan = self.chosen
        if self.progress:
            self.progress("encode", 1, 1)
        return encoded

    def result(self) -> Quantized:
        tensors, plan = self.tensors()
        return Quantized(tensors, plan, self.reports(), self.meta())

    def allocation(self) -> list[Allocation]:
        out = []
        for name, tp in self.plan.items():
            if name in self.choice:
                c = self.choice[name]
                out.append(Allocation(name, tp.role, c.scheme, c.key, True))
            elif tp.bits is not None:
                out.append(Allocation(name, tp.role, tp.scheme, self.fixed_candidate(name).key, False))
        return out

    def _prune(self, encoded: EncodedArtifact) -> EncodedArtifact:
        """Zero the cheapest ±1 codes until the encoded artifact fits the room (each tensor's codes priced by its
        real compressed bytes; confirmed by encoding, the target lowered by the excess while over)."""
        tensors, _ = self.tensors()
        quant = {n: v for n, v in tensors.items() if isinstance(v, QuantizedTensor)}
        real = {t.name: t.codes_bytes for t in encoded.info.tensors}
        pricers = {n: ScaledEntropyPricer.fit(qt.codes.numpy(), real[n]) for n, qt in quant.items()}
        hdiag = {n: None if (h := hessian_of(self.calibration.hessians, n)) is None
                 else torch.diagonal(h if quant[n].rotation is None else rotate_hessian(h, quant[n].rotation),
                                     dim1=-2, dim2=-1) for n in quant}  # in the basis of the codes
        means = sorted(float(d.mean()) for d in hdiag.values() if d is not None)
        h_default = means[len(means) // 2] if means else 1.0
        costs = {n: prune_costs(quant[n], hdiag[n], h_default) for n in quant}
        fixed = encoded.info.total_bytes - sum(real[n] for n in quant)
        target = self.room - fixed
        best = None
        for _ in range(_PRUNE_ROUNDS):
            res = prune_to_bytes(quant, costs, pricers, target)
            if res is None:
                floor = fixed + pruned_floor(quant, costs, pricers)
                raise OptionError(f"budget {self.opts.budget:,} bytes cannot be met by pruning: zeroing every ±1 "
                                  f"code leaves about {floor:,.0f} artifact bytes + {self.opts.budget - self.room:,} "
                                  "code bytes; raise the budget or lower the widths (or let --budget allocate them)")
            self.pruned, self.override = res.pruned, res.tensors
            out = self.encode()
            if out.info.total_bytes <= self.room and (best is None or out.info.total_bytes > best[1].info.total_bytes):
                best = (res, out)
            if (1 - BUDGET_TOLERANCE / 2) * self.room <= out.info.total_bytes <= self.room:
                break
            # over: lower the target by the excess; well under: give back part of the gap
            target += (1 - BUDGET_TOLERANCE / 4) * self.room - out.info.total_bytes
        if best is None:
            raise OptionError(f"pruning did not reach the budget of {self.opts.budget:,} bytes in {_PRUNE_ROUNDS} "
                              "rounds; lower the widths or raise the budget")
        res, out = best
        self.pruned, self.override = res.pruned, res.tensors
        return out
