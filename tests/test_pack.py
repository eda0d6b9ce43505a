import pytest
import torch
from hypothesis import given, settings, strategies as st

from golfquant.errors import ArtifactError
from golfquant.pack import LAYOUTS, layouts_for, pack_codes, packed_length, plane_widths, unpack_codes
from golfquant.quant.qtensor import qmax

SHAPES = [(0,), (1,), (7,), (1, 1), (3, 5), (0, 4), (4, 0), (2, 3, 5), (1, 9, 2)]


def random_codes(shape, bits, seed=0):
    r = qmax(bits)
    return torch.randint(-r, r + 1, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_every_layout(bits, shape):
    codes = random_codes(shape, bits, seed=bits)
    for layout in layouts_for(bits, len(shape)):
        data = pack_codes(codes, bits, layout)
        assert len(data) == packed_length(codes.numel(), bits, layout)
        back = unpack_codes(data, bits, layout, shape)
        assert back.dtype == torch.int8 and back.shape == codes.shape
        assert torch.equal(back, codes), layout


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), shape=st.lists(st.integers(0, 9), min_size=1, max_size=3), seed=st.integers(0, 99))
def test_round_trip_property(bits, shape, seed):
    codes = random_codes(tuple(shape), bits, seed)
    for layout in layouts_for(bits, len(shape)):
        assert torch.equal(unpack_codes(pack_codes(codes, bits, layout), bits, layout, shape), codes)


def test_layouts_for():
    assert layouts_for(4) == LAYOUTS
    assert "nibble" not in layouts_for(5) and "nibble.T" not in layouts_for(8)
    assert layouts_for(2, ndim=1) == ("int8", "nibble", "planes")
    assert plane_widths(6) == (4, 2) and plane_widths(7) == (4, 2, 1) and plane_widths(8) == (4, 4)
    assert plane_widths(3) == (2, 1) and plane_widths(5) == (4, 1) and plane_widths(2) == (2,)


def test_golden_bytes_follow_the_spec():
    t = lambda values: torch.tensor(values, dtype=torch.int8)  # noqa: E731
    # int8: the signed value itself
    assert pack_codes(t([-127, 5, 0]), 8, "int8") == bytes([0x81, 0x05, 0x00])
    # nibble, 4 bits: u = q + 8 = [1, 15, 8]; element 0 low nibble, odd count padded with 0
    assert pack_codes(t([-7, 7, 0]), 4, "nibble") == bytes([0xF1, 0x08])
    # planes, 3 bits = 2 + 1: u = [1, 7, 4, 5, 3]; low plane u & 3 = [1, 3, 0, 1, 3], four per byte LSB first;
    # then the 1-bit plane (u >> 2) & 1 = [0, 1, 1, 1, 0]
    assert pack_codes(t([-3, 3, 0, 1, -1]), 3, "planes") == bytes([0x4D, 0x03, 0x0E])
    # planes, 6 bits = 4 + 2: u = [63, 1]
    assert pack_codes(t([31, -31]), 6, "planes") == bytes([0x1F, 0x03])
    # planes, 8 bits = 4 + 4: u = [255, 1, 133]
    assert pack_codes(t([127, -127, 5]), 8, "planes") == bytes([0x1F, 0x05, 0x0F, 0x08])
    # 4 bits: planes and nibble are the same bytes
    codes = random_codes((5, 7), 4)
    assert pack_codes(codes, 4, "planes") == pack_codes(codes, 4, "nibble")


def test_transposed_order_swaps_the_last_two_dims():
    codes = torch.arange(6, dtype=torch.int8).reshape(2, 3)
    assert pack_codes(codes, 8, "int8.T") == bytes([0, 3, 1, 4, 2, 5])
    bank = torch.arange(12, dtype=torch.int8).reshape(2, 2, 3)
    assert pack_codes(bank, 8, "int8.T") == bytes([0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11])


def test_pack_accepts_numpy_and_rejects_bad_input():
    codes = random_codes((3, 4), 5)
    assert pack_codes(codes.numpy(), 5, "planes") == pack_codes(codes, 5, "planes")
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([16], dtype=torch.int8), 5, "int8")  # outside [-15, 15]
    with pytest.raises(ValueError):
        pack_codes(codes, 5, "nibble")
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(4, dtype=torch.int8), 4, "int8.T")
    with pytest.raises(TypeError):
        pack_codes(codes.to(torch.int16), 5, "int8")


def test_unpack_rejects_malformed_data():
    codes = random_codes((3, 5), 3)
    data = pack_codes(codes, 3, "nibble")
    with pytest.raises(ArtifactError, match="take 8 bytes"):
        unpack_codes(data[:-1], 3, "nibble", (3, 5))
    with pytest.raises(ArtifactError):
        unpack_codes(data + b"\0", 3, "nibble", (3, 5))
    with pytest.raises(ArtifactError, match="padding"):
        unpack_codes(data[:-1] + bytes([data[-1] | 0x10]), 3, "nibble", (3, 5))
    with pytest.raises(ArtifactError, match="outside"):  # u = 0 is q = -4, outside [-3, 3]
        unpack_codes(b"\x00" + data[1:], 3, "nibble", (3, 5))
    with pytest.raises(ArtifactError, match="outside"):
        unpack_codes(bytes([0x80]), 8, "int8", (1,))  # -128
    for bits, layout, shape in [(3, "bogus", (2,)), (5, "nibble", (2,)), (3, "int8.T", (2,)), (9, "int8", (2,))]:
        with pytest.raises(ArtifactError):
            unpack_codes(b"\0\0", bits, layout, shape)
    with pytest.raises(ArtifactError):
        unpack_codes(b"", 3, "int8", (-1,))
    with pytest.raises(ArtifactError):  # a huge declared shape fails on the length check, before any allocation
        unpack_codes(b"\0", 8, "int8", (1 << 40, 1 << 20))


def test_packed_lengths():
    assert packed_length(7, 2, "planes") == 2
    assert packed_length(7, 6, "planes.T") == 4 + 2
    assert packed_length(7, 7, "planes") == 4 + 2 + 1
    assert packed_length(7, 3, "nibble") == 4
    assert packed_length(0, 8, "planes") == 0
    assert packed_length(7, 8, "int8") == 7
