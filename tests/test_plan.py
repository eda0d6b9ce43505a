import pytest
import torch

from golfquant.errors import OptionError
from golfquant.plan import PlanOptions, TensorPlan, make_plan, parse_rule, parse_scheme, role_of


@pytest.mark.parametrize("name, role", [
    ("skip_weights", "control"),
    ("blocks.3.attn_scale", "control"),
    ("blocks.3.mlp_scale", "control"),
    ("blocks.3.resid_mix", "control"),
    ("blocks.3.attn.q_gain", "control"),
    ("skip_gates", "control"),
    ("parallel_post_lambdas", "control"),
    ("blocks.2.attn.attn_gate_w", "control"),
    ("smear_gate.weight", "control"),
    ("smear_lambda", "control"),
    ("tok_emb.weight", "embed"),
    ("lm_head.weight", "embed"),
    ("bigram.embed.weight", "embed"),
    ("ve_shared.embed.weight", "embed"),
    ("blocks.0.attn.c_q.weight", "attn"),
    ("blocks.0.attn.c_k.weight", "attn"),
    ("blocks.0.attn.c_v.weight", "attn"),
    ("blocks.0.attn.proj.weight", "attn"),
    ("qo_bank", "attn"),
    ("kv_bank", "attn"),
    ("blocks.0.mlp.fc.weight", "mlp"),
    ("blocks.0.mlp.proj.weight", "mlp"),
    ("mlp_up_bank", "mlp"),
    ("mlp_down_bank", "mlp"),
    ("bigram.proj.weight", "other"),
    ("final_norm.something", "other"),
])
def test_roles_follow_the_challenge_names(name, role):
    assert role_of(name) == role


def state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "tok_emb.weight": torch.randn(64, 32, generator=g).bfloat16(),
        "skip_weights": torch.randn(4, 64, generator=g),  # control, above float_max_numel
        "blocks.0.attn_scale": torch.ones(32),
        "blocks.0.attn.c_q.weight": torch.randn(32, 32, generator=g),
        "blocks.0.mlp.fc.weight": torch.randn(64, 32, generator=g),
        "blocks.0.mlp.proj.weight": torch.randn(4, 8, generator=g),  # small: fp16
        "qo_bank": torch.randn(2, 32, 32, generator=g),
        "mlp_up_bank": torch.randn(2, 64, 32, generator=g),
        "bigram.proj.weight": torch.randn(32, 32, generator=g),
        "big_vector": torch.randn(300, generator=g),
        "steps": torch.tensor([7], dtype=torch.int64),
    }


def test_default_plan():
    opts = PlanOptions(mlp="int5", attn="int6", embed="int7", other="int4", float_max_numel=100)
    plan = make_plan(state_dict(), opts)
    got = {name: (p.role, p.scheme, p.bits) for name, p in plan.items()}
    assert got == {
        "tok_emb.weight": ("embed", "int7", 7),
        "skip_weights": ("control", "fp32", None),
        "blocks.0.attn_scale": ("control", "fp32", None),
        "blocks.0.attn.c_q.weight": ("attn", "int6", 6),
        "blocks.0.mlp.fc.weight": ("mlp", "int5", 5),
        "blocks.0.mlp.proj.weight": ("mlp", "fp16", None),
        "qo_bank": ("attn", "int6", 6),
        "mlp_up_bank": ("mlp", "int5", 5),
        "bigram.proj.weight": ("other", "int4", 4),
        "big_vector": ("other", "fp16", None),
        "steps": ("other", "raw", None),
    }
    assert plan["tok_emb.weight"] == TensorPlan("tok_emb.weight", "embed", "int7", 7, (64, 32), "bfloat16")
    assert plan["steps"].dtype == "int64" and plan["qo_bank"].shape == (2, 32, 32)


def test_challenge_threshold_keeps_small_tensors_fp16():
    plan = make_plan(state_dict(), PlanOptions())  # float_max_numel 65536: everything here is small
    assert {p.scheme for n, p in plan.items() if p.role not in ("control",) and n != "steps"} == {"fp16"}


def test_rules_first_match_wins_and_beat_roles():
    opts = PlanOptions(mlp="int5", float_max_numel=100, rules=[
        parse_rule(r"mlp\.fc=int3"), parse_rule(r"blocks\.0\.(attn|mlp)\.=int8"), parse_rule("skip_weights=fp16"),
        parse_rule("tok_emb=bf16"), parse_rule(r"big_vector=fp32"),
    ])
    plan = make_plan(state_dict(), opts)
    assert plan["blocks.0.mlp.fc.weight"].scheme == "int3"  # first rule, although the second also matches
    assert plan["blocks.0.attn.c_q.weight"].scheme == "int8"
    assert plan["blocks.0.mlp.proj.weight"].scheme == "int8"  # rules beat the small-tensor default
    assert plan["skip_weights"].scheme == "fp16"  # and the control default
    assert plan["tok_emb.weight"].scheme == "bf16"
    assert plan["big_vector"].scheme == "fp32"
    assert plan["mlp_up_bank"].scheme == "int5"


def test_rule_errors():
    with pytest.raises(OptionError, match="'nothing_here' matches no float tensor"):
        make_plan(state_dict(), PlanOptions(rules=[("nothing_here", "int4")]))
    with pytest.raises(OptionError, match="matches no float tensor"):  # only a non-float tensor matches
        make_plan(state_dict(), PlanOptions(rules=[("steps", "int4")]))
    with pytest.raises(OptionError, match="bad rule regex"):
        parse_rule("blocks[=int4")
    with pytest.raises(OptionError, match="bad rule regex"):
        make_plan(state_dict(), PlanOptions(rules=[("(", "int4")]))
    with pytest.raises(OptionError, match="REGEX=SCHEME"):
        parse_rule("int4")
    with pytest.raises(OptionError, match="cannot quantize 'big_vector'"):
        make_plan(state_dict(), PlanOptions(rules=[("big_vector", "int4")]))
    assert parse_rule("a=b=int4") == ("a=b", "int4")


def test_scheme_and_option_errors():
    with pytest.raises(OptionError, match="unknown scheme 'int9': use int2..int8, fp16, bf16 or fp32"):
        parse_scheme("int9")
    with pytest.raises(OptionError):
        parse_scheme("raw")  # internal: never chosen by a user
    assert parse_scheme(" INT4 ") == "int4"
    with pytest.raises(OptionError, match="unknown scheme 'int1'"):
        make_plan(state_dict(), PlanOptions(mlp="int1"))
