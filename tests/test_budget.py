"""`--budget`: measured allocation over every matrix, confirmed against the uniform plans, fitted, cached."""
from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

import golfquant
from golfquant import budget as budget_module
from golfquant.api import QuantizeResult, quantize_checkpoint
from golfquant.artifact import artifact_sizes, load_artifact, read_artifact
from golfquant.calib import CalibConfig
from golfquant.checkpoint import load_checkpoint, save_checkpoint
from golfquant.data import default_data_dir
from golfquant.errors import OptionError
from golfquant.measure import VERSION, Candidate, candidate_grid
from golfquant.options import QuantizeOptions
from golfquant.plan import PlanOptions
from golfquant.quant.lqer import LqerOptions
from golfquant_cli.main import cli

from helpers import tiny_checkpoint

CALIB = CalibConfig(seqs=2, seq_len=32, batch=2, holdout=128)
BUNDLED = default_data_dir() / "model.pt"


def opts(budget, **kw):
    return QuantizeOptions(calib=CALIB, budget=budget, **kw)


def written(ckpt, out, options, **kw) -> QuantizeResult:
    result = quantize_checkpoint(ckpt, options, **kw)
    result.save(out)
    return result


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "mini.pt", num_layers=2, model_dim=64, vocab_size=256,
                           num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def sizes(ckpt):
    """Artifact bytes of the uniform int4 and int8 plans (every matrix quantized)."""
    size = {}
    for b in (4, 8):
        plan = PlanOptions(mlp=f"int{b}", attn=f"int{b}", embed=f"int{b}", float_max_numel=0)
        size[b] = quantize_checkpoint(ckpt, QuantizeOptions(plan=plan, calib=CALIB, clip="sdclip:8")).total_bytes
    return size


def test_budget_is_never_exceeded_and_is_spent(ckpt, sizes, tmp_path):
    code_bytes = 1800
    for frac in (0.0, 0.5, 1.0):
        budget = int(sizes[4] + frac * (sizes[8] - sizes[4])) + code_bytes
        out = tmp_path / f"{frac}.gqa"
        r = written(ckpt, out, opts(budget), code_bytes=code_bytes, cache=tmp_path / "m")
        assert r.total_bytes == out.stat().st_size + code_bytes <= budget
        assert r.total_bytes >= 0.97 * budget, (budget, r.total_bytes)
        assert all(a.free for a in r.budget.allocation)
        load_artifact(out)  # valid and complete
        meta = read_artifact(out).manifest["meta"]  # names what was chosen
        assert (meta["plan"], meta["allocation"]) == (r.budget.chosen, r.meta["allocation"])


def test_unreachable_budget_names_the_smallest_size_and_writes_no_artifact(ckpt, tmp_path):
    with pytest.raises(OptionError, match=r"cannot be met: the smallest reachable artifact is [\d,]+ bytes \+ 0 code"):
        quantize_checkpoint(ckpt, opts(5_000))


def test_never_worse_than_the_uniform_plans_on_the_measured_tokens(ckpt, sizes, tmp_path):
    budget = (sizes[4] + sizes[8]) // 2
    r = written(ckpt, tmp_path / "a.gqa", opts(budget))
    chosen = [p for p in r.budget.plans if p.chosen]
    assert len(chosen) == 1
    assert chosen[0].plan == r.budget.chosen == read_artifact(tmp_path / "a.gqa").manifest["meta"]["plan"]
    measured = [p.measured_kl for p in r.budget.plans if p.plan != "allocated" and p.measured_kl is not None]
    assert len(measured) >= 2  # the uniform plans that fit this budget were measured
    assert chosen[0].measured_kl <= min(measured)
    assert all(p.total_bytes <= budget for p in r.budget.plans if p.total_bytes is not None)


def test_a_tensor_made_sensitive_receives_more_bytes(tmp_path):
    """The last MLP's output projection scaled up x4 (no normalisation follows it before the head's final_norm, so
    the same relative error costs ~16x more): the measured damage of its branch rises and the allocation moves
    bytes to it. The bundled (trained) model, with the attention, the embedding and the first MLPs fixed."""
    name = "blocks.3.mlp.proj.weight"
    bundled = load_checkpoint(BUNDLED)
    loud = dict(bundled.state_dict) | {name: bundled.state_dict[name] * 4}
    save_checkpoint(tmp_path / "loud.pt", loud, bundled.config)
    options = QuantizeOptions(plan=PlanOptions(attn="int6", embed="int8", rules=[(r"blocks\.[01]\.mlp\.", "int6")]),
                              fixed_roles=("attn", "embed"), method="rtn", calib=CalibConfig(seqs=4, holdout=1024),
                              budget=2_150_000)

    def branch(path) -> tuple[float, float]:
        r = written(path, tmp_path / "x.gqa", options, cache=tmp_path / path.stem)
        assert {a.name for a in r.budget.allocation if a.free} == {f"blocks.{i}.mlp.{p}.weight" for i in (2, 3)
                                                                   for p in ("fc", "proj")}
        t = {t.name: t for t in artifact_sizes(tmp_path / "x.gqa").tensors}
        mine = [t[f"blocks.3.mlp.{p}.weight"] for p in ("fc", "proj")]
        damage = load_measurement_rows(tmp_path / f"{path.stem}.measurement.json", name)
        return sum(x.total for x in mine) / sum(x.numel for x in mine), damage

    quiet_bytes, quiet_damage = branch(BUNDLED)
    loud_bytes, loud_damage = branch(tmp_path / "loud.pt")
    assert min(l / q for l, q in zip(loud_damage, quiet_damage)) > 4
    assert loud_bytes > 1.2 * quiet_bytes, (quiet_bytes, loud_bytes)


def load_measurement_rows(path, name) -> list[float]:
    return [r["damage"] for r in json.loads(path.read_text())["tensors"][name] if r["candidate"]["bits"]]


def test_measurement_is_cached_reused_and_invalidated(ckpt, sizes, tmp_path):
    budget = (sizes[4] + sizes[8]) // 2
    stem = tmp_path / "a"
    first = quantize_checkpoint(ckpt, opts(budget), cache=stem)
    assert (tmp_path / "a.measurement.json").exists() and (tmp_path / "a.calibration.safetensors").exists()
    again = quantize_checkpoint(ckpt, opts(budget + 500), cache=stem)
    assert not first.budget.measurement.cached and again.budget.measurement.cached
    # the cache changes nothing: the same bytes as a run without it
    assert quantize_checkpoint(ckpt, opts(budget + 500)).data == again.data
    # another checkpoint, or other options, measure again
    other = load_checkpoint(ckpt)
    other.state_dict["blocks.0.attn.c_q.weight"] = other.state_dict["blocks.0.attn.c_q.weight"] * 1.01
    save_checkpoint(tmp_path / "other.pt", other.state_dict, other.config)
    changed = [quantize_checkpoint(tmp_path / "other.pt", opts(budget), cache=stem),
               quantize_checkpoint(ckpt, opts(budget, method="rtn"), cache=stem),
               quantize_checkpoint(ckpt, QuantizeOptions(
                   calib=CalibConfig(seqs=2, seq_len=32, batch=2, holdout=128, seed=7), budget=budget), cache=stem)]
    assert [c.budget.measurement.cached for c in changed] == [False, False, False]
    # a damaged cache is measured again, never trusted
    (tmp_path / "a.measurement.json").write_text("{not json")
    (tmp_path / "a.calibration.safetensors").write_bytes(b"junk")
    assert not quantize_checkpoint(ckpt, opts(budget), cache=stem).budget.measurement.cached


def test_a_new_measurement_version_keeps_the_cached_calibration(ckpt, sizes, tmp_path, monkeypatch):
    budget = (sizes[4] + sizes[8]) // 2
    stem = tmp_path / "a"
    quantize_checkpoint(ckpt, opts(budget), cache=stem)
    real = budget_module.cache_key
    monkeypatch.setattr(budget_module, "cache_key", lambda d, o, version=VERSION + 1: real(d, o, version))
    monkeypatch.setattr(budget_module, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    assert not quantize_checkpoint(ckpt, opts(budget), cache=stem).budget.measurement.cached


def test_float_is_a_candidate_and_the_convention_holds_only_when_asked(ckpt, sizes, tmp_path):
    huge = 10 * sizes[8]
    r = quantize_checkpoint(ckpt, opts(huge))
    assert {a.scheme for a in r.budget.allocation} == {"fp16"}  # no damage left to remove: everything float
    kept = quantize_checkpoint(ckpt, opts(3 * sizes[8], fixed_float=True))
    small = {n for n, tp in kept.plan.items() if "blocks" in n and tp.scheme == "fp16"}
    assert small and not small & {a.name for a in kept.budget.allocation}  # <= 65,536 elements: fixed fp16


def test_explicit_widths_stay_fixed(ckpt, sizes, tmp_path):
    r = quantize_checkpoint(ckpt, opts(sizes[8], fixed_roles=("mlp",), plan=PlanOptions(mlp="int3")))
    assert r.total_bytes <= sizes[8]
    for a in r.budget.allocation:
        assert a.free == (".mlp." not in a.name)
        if ".mlp." in a.name:
            assert a.scheme == "int3"


def test_candidate_grid_holds_float_records_and_lqer_only_for_matrices():
    grid = candidate_grid("mlp", 2)
    keys = [c.key for c in grid]
    assert keys[0] == "fp16" and len(set(keys)) == len(keys)
    assert Candidate(6, grid[0].clip) not in grid  # the float candidate has no clip
    assert "int6 sdclip:default=12.85" in keys and "int8 sdclip:default=20.0" in [c.key for c in candidate_grid("embed", 2)]
    assert any(c.lqer for c in grid) and not any(c.lqer for c in candidate_grid("mlp", 3))
    assert all(Candidate.from_json(c.to_json()) == c for c in grid)
    assert {c.bits for c in grid} == {None, *range(2, 9)}
    assert all(re.fullmatch(r"fp16|int\d sdclip:default=[\d.]+( \+lqer4)?", k) for k in keys)


def test_prune_to_budget_keeps_the_plan(ckpt, tmp_path):
    plan = PlanOptions(mlp="int5", attn="int5", embed="int6", float_max_numel=0)
    plain = written(ckpt, tmp_path / "p.gqa", QuantizeOptions(plan=plan, calib=CALIB, method="rtn"))
    budget = int(plain.total_bytes * 0.97)
    r = written(ckpt, tmp_path / "q.gqa", QuantizeOptions(plan=plan, calib=CALIB, method="rtn", budget=budget,
                                                         prune_to_budget=True))
    assert r.total_bytes <= budget and r.budget.pruned_codes > 0
    assert [tp.scheme for tp in r.plan.values()] == [tp.scheme for tp in plain.plan.values()]
    assert torch.equal(load_artifact(tmp_path / "q.gqa")["skip_weights"], load_artifact(tmp_path / "p.gqa")["skip_weights"])


@pytest.mark.parametrize("kw, match", [
    ({"lqer": LqerOptions(top=3)}, "buys LQER"),
    ({"lqer": LqerOptions(top=3), "prune_to_budget": True}, "--lqer cannot be combined with --prune-to-budget"),
    ({"sequential": True}, "--sequential cannot be combined"),
    ({"clip": "size:3"}, "--clip size and --budget"),
    ({"budget": 0}, "positive number of bytes")])
def test_options_that_cannot_go_with_a_budget_are_refused(kw, match):
    with pytest.raises(OptionError, match=match):
        QuantizeOptions(**({"budget": 10_000} | kw))


def test_a_budget_without_code_says_it_counted_the_code_as_zero(ckpt, sizes, tmp_path):
    args = ["quantize", str(ckpt), "-o", str(tmp_path / "a.gqa"), "--calib-seqs", "2", "--calib-len", "32",
            "--budget", str(sizes[8]), "--no-cache", "--method", "rtn"]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["note"] == "no --code given: the budget counts the code as 0 bytes"
    code = tmp_path / "train_gpt.py"
    code.write_text("print('hi')\n")
    res = CliRunner().invoke(cli, [*args, "--code", str(code), "--json"])
    assert "note" not in json.loads(res.stdout) and json.loads(res.stdout)["code_bytes"] == code.stat().st_size


def test_the_search_shares_the_callers_weights_and_gives_them_back_unchanged(ckpt, sizes, monkeypatch):
    # The float model holds the state dict's own tensors (no second copy at record size): its KL passes swap
    # other tensors in, and must leave every one of the caller's bit for bit.
    sd = load_checkpoint(ckpt).state_dict
    before = {k: v.clone() for k, v in sd.items()}
    built = []
    build = budget_module.build_float_model
    monkeypatch.setattr(budget_module, "build_float_model", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    golfquant.quantize(sd, opts((sizes[4] + sizes[8]) // 2))
    params = dict(built[0].named_parameters())
    assert all(params[k].data_ptr() == v.data_ptr() for k, v in sd.items() if k in params)
    assert all(torch.equal(sd[k], v) for k, v in before.items())



def test_the_search_factorises_each_shared_hessian_once(ckpt, sizes, monkeypatch):
    # c_q, c_k and c_v read one input and share one Hessian object: the budget quantizes their values against one
    # factorisation of it at a time (per rotation), not one per weight.
    seen = {}  # (Hessian, rotation) -> the factorisations used with it, and the weights
    many = budget_module.quantize_tensor_many

    def spy(t, tp, settings, h, options, rotation=None, prepared=None):
        ids, names = seen.setdefault((id(h), rotation), (set(), set()))
        ids.add(id(prepared))
        names.add(tp.name)
        return many(t, tp, settings, h, options, rotation, prepared)

    monkeypatch.setattr(budget_module, "quantize_tensor_many", spy)
    golfquant.quantize(load_checkpoint(ckpt).state_dict, opts((sizes[4] + sizes[8]) // 2))
    assert any(len(names) == 3 for _, names in seen.values())  # c_q, c_k, c_v
    # one factorisation while the plans are solved, and one made again after they are dropped for the confirmation
    assert all(len(ids) <= 2 for ids, _ in seen.values()), [(len(i), sorted(n)) for i, n in seen.values()]
