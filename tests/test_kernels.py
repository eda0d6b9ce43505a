"""Triton dequant kernels (run by the CPU interpreter) against their torch references, bit for bit.

TRITON_INTERPRET must be set before `kernels` is imported: the kernels are built at import time.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the kernels under test are Triton kernels")

import kernels.dequant as kd  # noqa: E402
from golfquant.artifact import load_artifact, read_artifact, write_artifact  # noqa: E402
from golfquant.export import loader_source  # noqa: E402
from golfquant.model import CastedLinear  # noqa: E402
from golfquant.pack import pack_codes, unpack_codes  # noqa: E402
from golfquant.quant.clip import parse_clip  # noqa: E402
from golfquant.quant.lqer import apply_lqer  # noqa: E402
from golfquant.quant.qtensor import QuantizedTensor, qmax  # noqa: E402
from golfquant.quant.quantize import Quantizer  # noqa: E402
from golfquant.quant.rtn import quantize_rtn  # noqa: E402
from golfquant.quant.salient import SalientOptions  # noqa: E402
from kernels import (KernelConfig, PackedWeight, QuantLinear, dequant_matmul, dequant_matmul_reference,  # noqa: E402
                     dequantize_packed, dequantize_reference, swap_linears, unpack_reference)

if not kd.INTERPRET:
    pytest.skip("kernels was imported before TRITON_INTERPRET=1 was set (set it in conftest.py to run these)",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
ALL_LAYOUTS = [(bits, base + suffix) for bits in range(2, 9) for base in ("int8", "nibble", "planes")
               for suffix in ("", ".T") if base != "nibble" or bits <= 4]


def pack(codes: torch.Tensor, bits: int, layout: str) -> torch.Tensor:
    """The project's packer, as the uint8 tensor the kernels take."""
    return torch.frombuffer(bytearray(pack_codes(codes, bits, layout)), dtype=torch.uint8)


def random_weight(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    r = qmax(bits)
    codes = torch.randint(-r, r + 1, shape, generator=g, dtype=torch.int8)
    scales = (torch.rand(shape[:-1], generator=g) * 0.05 + 1e-3).half()
    return codes, scales


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), f"max |diff| {(got.double() - want.double()).abs().max().item()}"


@pytest.mark.parametrize("shape", [(300, 37), (200, 72)], ids=["unaligned", "aligned"])
def test_kernel_matches_reference_every_layout(shape):
    # 300x37: lines never start on byte boundaries (gather path); 200x72: they do in both orientations
    # (contiguous-bytes path). Neither is a multiple of the 32x128 block.
    for i, (bits, layout) in enumerate(ALL_LAYOUTS):
        codes, scales = random_weight(shape, bits, seed=i)
        packed = pack(codes, bits, layout)
        assert torch.equal(unpack_reference(packed, bits, layout, shape), codes), (bits, layout)
        want = dequantize_reference(packed, bits, layout, shape, scales, dtype=torch.float32)
        got = dequantize_packed(packed, bits, layout, shape, scales, dtype=torch.float32, backend="triton")
        assert_same_bits(got, want)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's inf
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,layout", [(4, "nibble"), (6, "planes.T"), (8, "int8"), (3, "planes")])
def test_output_dtypes_round_like_torch(dtype, bits, layout):
    shape = (257, 129)
    codes, scales = random_weight(shape, bits, seed=bits)
    # Ties: 1 * (1 + 2**-8) and 1 * (1 + 3 * 2**-8) lie halfway between bf16 neighbours (one rounds down to
    # even, one up); 7 * 2**15 overflows fp16 to inf.
    codes[:3, 0] = torch.tensor([1, 1, min(7, qmax(bits))], dtype=torch.int8)
    scales[:3] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 2.0 ** 15], dtype=torch.float16)
    packed = pack(codes, bits, layout)
    want = dequantize_reference(packed, bits, layout, shape, scales, dtype=dtype)
    assert torch.equal(want, (codes.float() * scales.float()[:, None]).to(dtype))
    assert_same_bits(dequantize_packed(packed, bits, layout, shape, scales, dtype=dtype, backend="triton"), want)


@pytest.mark.parametrize("layout", ["planes", "nibble.T"])
def test_bank_of_matrices(layout):
    shape = (3, 40, 19)
    codes, scales = random_weight(shape, 4, seed=7)
    packed = pack(codes, 4, layout)
    want = QuantizedTensor(codes, scales, 4).dequantize(torch.float16)
    assert_same_bits(dequantize_packed(packed, 4, layout, shape, scales, dtype=torch.float16, backend="triton"),
                     want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lqer_kernel_matches_reference(dtype):
    shape, rank = (130, 70), 5
    codes, scales = random_weight(shape, 6, seed=3)
    g = torch.Generator().manual_seed(4)
    lqer = (torch.randn(shape[0], rank, generator=g) * 1e-2, torch.randn(rank, shape[1], generator=g) * 1e-2)
    packed = pack(codes, 6, "planes")
    want = dequantize_reference(packed, 6, "planes", shape, scales, lqer, dtype)
    assert not torch.equal(want, dequantize_reference(packed, 6, "planes", shape, scales, None, dtype))
    got = dequantize_packed(packed, 6, "planes", shape, scales, lqer, dtype, backend="triton",
                            config=KernelConfig(block_rows=64, block_cols=32))
    assert_same_bits(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_is_the_projects_dequantize(dtype):
    shape = (33, 50)
    for bits, layout in [(2, "planes"), (4, "nibble.T"), (5, "int8"), (7, "planes.T")]:
        codes, scales = random_weight(shape, bits, seed=bits)
        packed = pack(codes, bits, layout)
        assert torch.equal(unpack_reference(packed, bits, layout, shape),
                           unpack_codes(packed.numpy().tobytes(), bits, layout, shape))
        got = dequantize_packed(packed, bits, layout, shape, scales, dtype=dtype, backend="torch")
        assert_same_bits(got, QuantizedTensor(codes, scales, bits).dequantize(dtype))


def test_lqer_weights_are_bit_identical_on_every_path(tmp_path):
    # A @ B is summed in one fp32 order everywhere (kernels.lowrank_reference): the library's reference, the
    # packed reader's kernels (Triton and torch), QuantLinear and the exported loader. On these factors a BLAS
    # matmul rounds ~0.5% of the outputs differently (CPU torch 2.x), so a path that used one fails here.
    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(1)) * 0.02
    qt = apply_lqer(quantize_rtn(w, 4, "sdclip:8"), w)
    want = qt.dequantize(torch.float32)
    path = tmp_path / "lqer.gqa"
    write_artifact(path, {"fc.weight": qt}, None)
    weight = read_artifact(path, packed=True).tensors["fc.weight"]
    assert isinstance(weight, PackedWeight) and weight.lqer is not None
    namespace = {}
    exec(compile(loader_source(), "<exported>", "exec"), namespace)
    paths = {"load_artifact": load_artifact(path)["fc.weight"],
             "exported loader": namespace["load_artifact"](path)["fc.weight"],
             "triton": weight.dequantize(torch.float32, backend="triton"),
             "torch reference": weight.to("cpu").dequantize(torch.float32, backend="torch"),
             "QuantLinear": QuantLinear(weight, backend="triton").dequantized_weight(torch.float32),
             "QuantLinear torch": QuantLinear(weight, backend="torch").dequantized_weight(torch.float32)}
    for name, got in paths.items():
        assert got.dtype == torch.float32, name
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_salient_weights_are_bit_identical_on_every_path(tmp_path, dtype):
    # A mixed-width weight: int4 with one group of 32 input columns at int8 (and LQER over the mixed tensor). The
    # packed path dequantizes the salient sub-matrix through the same kernel and writes its columns in.
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 128, generator=g) * 0.02
    x = torch.randn(512, 128, generator=g)
    x[:, 64:96] *= 10
    qt, _ = Quantizer()(w, 4, parse_clip("sdclip:8"), None, x.T @ x, salient=SalientOptions(1, 32, 8))
    assert qt.salient.groups == (2,)
    path = tmp_path / "salient.gqa"
    write_artifact(path, {"fc.weight": apply_lqer(qt, w), "plain.weight": qt}, None)
    namespace = {}
    exec(compile(loader_source(), "<exported>", "exec"), namespace)
    exported = namespace["load_artifact"](path)
    for name, value in read_artifact(path, packed=True).tensors.items():
        assert isinstance(value, PackedWeight) and value.salient is not None
        want = load_artifact(path, dtype=dtype)[name]
        paths = {"exported loader": exported[name].to(dtype),
                 "triton": value.dequantize(dtype, backend="triton"),
                 "torch reference": value.dequantize(dtype, backend="torch"),
                 "QuantLinear": QuantLinear(value, backend="triton").dequantized_weight(dtype),
                 "QuantLinear torch": QuantLinear(value, backend="torch").dequantized_weight(dtype)}
        for got in paths.values():
            assert_same_bits(got, want)
        layer = QuantLinear(value, backend="triton")
        if dtype == torch.float32:  # few rows, but salient groups: dequantized and F.linear, not the fused kernel
            inp = torch.randn(3, 128, generator=g)
            assert torch.equal(layer(inp), torch.nn.functional.linear(inp, want))
        assert torch.equal(layer.to(torch.bfloat16).packed_weight.salient[1].scales, value.salient[1].scales)


def matmul_bound(x, w, dtype):
    """Error bound of an fp32-accumulated product rounded to `dtype` (see kernels/matmul.py)."""
    exact = x.double() @ w.double().T
    k = x.shape[1]
    return exact, (x.double().abs() @ w.double().abs().T) * k * 2 ** -20 + torch.finfo(dtype).eps * exact.abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,layout,m", [(4, "nibble", 1), (6, "planes", 64), (5, "planes.T", 17),
                                           (8, "int8", 3)])
def test_fused_matmul_within_rounding(dtype, bits, layout, m):
    shape = (129, 300)  # N, K: neither a multiple of the 32 x 128 tile
    codes, scales = random_weight(shape, bits, seed=m)
    packed = pack(codes, bits, layout)
    x = torch.randn(m, shape[1], generator=torch.Generator().manual_seed(m)).to(dtype)
    w = dequantize_reference(packed, bits, layout, shape, scales, dtype=dtype)
    exact, bound = matmul_bound(x, w, dtype)
    for y in (dequant_matmul(x, packed, bits, layout, shape, scales, backend="triton"),
              dequant_matmul_reference(x, packed, bits, layout, shape, scales)):
        assert y.dtype == dtype and y.shape == (m, shape[0])
        assert ((y.double() - exact).abs() <= bound).all()


def quant_linear_case(bits=4, layout="nibble", shape=(96, 80), lqer=False, seed=0):
    codes, scales = random_weight(shape, bits, seed)
    factors = (torch.randn(shape[0], 3) * 1e-2, torch.randn(3, shape[1]) * 1e-2) if lqer else None
    packed = PackedWeight(pack(codes, bits, layout), bits, layout, shape, scales, factors)
    return packed, packed.dequantize(torch.float32, backend="torch")


@pytest.mark.parametrize("lqer", [False, True])
def test_quant_linear_matches_float_linear(lqer):
    entry, weight = quant_linear_case(lqer=lqer)
    float_linear = nn.Linear(80, 96, bias=True)
    with torch.no_grad():
        float_linear.weight.copy_(weight)
    x = torch.randn(2, 5, 80)
    want = float_linear(x)
    for backend in ("torch", "triton"):
        quant = QuantLinear(entry, bias=float_linear.bias, backend=backend)
        got = quant(x)
        assert got.shape == (2, 5, 96)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Above FUSED_MAX_ROWS the weight is dequantized and multiplied by F.linear: the float layer exactly.
    x_big = torch.randn(70, 80)
    assert torch.equal(QuantLinear(entry, bias=float_linear.bias, backend="triton")(x_big), float_linear(x_big))


def test_quant_linear_under_autocast_is_casted_linear():
    entry, weight = quant_linear_case()
    casted = CastedLinear(80, 96, bias=False)
    with torch.no_grad():
        casted.weight.copy_(weight)
    quant = QuantLinear(entry, backend="torch")
    x = torch.randn(70, 80)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = casted(x), quant(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_quant_linear_keeps_scales_through_dtype_casts():
    entry, weight = quant_linear_case()
    quant = QuantLinear(entry).to(torch.float16)
    assert quant.scales.dtype == torch.float16 and torch.equal(quant.scales, entry.scales)
    assert torch.equal(quant.dequantized_weight(torch.float32), weight)


def test_swap_linears_replaces_named_linears():
    model = nn.Sequential(CastedLinear(80, 96, bias=False), nn.ReLU(), nn.Linear(96, 80, bias=False))
    entry, weight = quant_linear_case()
    x = torch.randn(4, 80)
    with torch.no_grad():
        model[0].weight.copy_(weight)
    want = model(x)
    swap_linears(model, {"0.weight": entry, "embed.weight": entry}, backend="triton")
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], nn.Linear)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        swap_linears(model, {"2.weight": entry})


def test_bad_inputs_are_refused(monkeypatch):
    codes, scales = random_weight((8, 8), 4, seed=0)
    packed = pack(codes, 4, "nibble")
    with pytest.raises(ValueError, match="bytes"):
        dequantize_packed(packed[:-1], 4, "nibble", (8, 8), scales)
    with pytest.raises(ValueError, match="nibble"):
        dequantize_packed(packed, 6, "nibble", (8, 8), scales)
    with pytest.raises(ValueError, match="scales"):
        dequantize_packed(packed, 4, "nibble", (8, 8), scales.float())
    monkeypatch.setattr(kd, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        dequantize_packed(packed, 4, "nibble", (8, 8), scales, backend="triton")


def test_imports_and_dequantizes_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import torch, kernels; "
            "p = torch.tensor([0x98, 0x7f], dtype=torch.uint8); "
            "w = kernels.dequantize_packed(p, 4, 'nibble', (2, 2), torch.ones(2, dtype=torch.float16), "
            "dtype=torch.float32); print(w.tolist())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[[0.0, 1.0], [7.0, -1.0]]"


COMPILE_FOR_SM90 = r'''
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.dequant import _dequant_kernel, kernel_widths, parse_layout
from kernels.matmul import _dequant_matmul_kernel

def build(kernel, pointers, ints, constexprs, **options):
    sig = {**pointers, **{n: "i32" for n in ints}, **{n: "constexpr" for n in constexprs}}
    hints = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in list(pointers) + ints}
    src = ASTSource(kernel, sig, constexprs, hints)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

def layout_constexprs(bits, layout):
    spec = parse_layout(bits, layout)
    w0, w1, w2 = kernel_widths(spec)
    return dict(W0=w0, W1=w1, W2=w2, XOR=spec.xor, OFFSET=spec.offset, TRANSPOSED=spec.transposed, ALIGNED=True)

for bits, layout, rank, out in [(4, "nibble", 0, "bf16"), (6, "planes.T", 2, "fp16")]:
    ptx = build(_dequant_kernel, dict(packed="*u8", scales="*fp16", lqer_a="*fp32", lqer_b="*fp32", out="*" + out),
                ["rows", "cols", "base1", "base2"],
                dict(layout_constexprs(bits, layout), RANK=rank, OUT_BF16=out == "bf16", BR=32, BC=128),
                num_warps=4, enable_fp_fusion=False)
    if layout == "nibble":  # packed bytes are loaded as vectors, bf16 stored 16 bytes at a time
        assert re.search(r"ld\.global(\.\w+)*\.v[24]\.b32", ptx) and re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx)
for bits, layout, x in [(6, "planes", "bf16"), (4, "nibble", "fp32")]:
    ptx = build(_dequant_matmul_kernel, dict(x="*" + x, packed="*u8", scales="*fp16", y="*" + x),
                ["M", "N", "K", "base1", "base2"],
                dict(layout_constexprs(bits, layout), OUT_BF16=x == "bf16", PRECISION="ieee" if x == "fp32" else "tf32",
                     K_TILES=4, BM=16, BN=32, BK=128), num_warps=4, enable_fp_fusion=False)
    assert ("mma" in ptx) == (x != "fp32")
print("compiled")
'''


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    # The interpreter checks values, not GPU code generation: compile the main variants to PTX/cubin for
    # sm_90 with triton's own compiler and ptxas, which need no GPU (a fresh cache so nothing is reused).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
