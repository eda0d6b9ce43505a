"""A linear layer that keeps its weight packed and dequantizes it at forward time.

`swap_linears` replaces a model's `nn.Linear` modules (the GPT's `CastedLinear` included) by `QuantLinear`s
built from packed weights, for evaluating an artifact without materialising its float weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.dequant import PackedWeight, check_lqer, check_packed, check_rotation, check_scales, parse_layout
from kernels.matmul import FUSED_MAX_ROWS, dequant_matmul


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + bias, W [out, in] held as packed codes + fp16 scales (+ LQER factors).

    Like `CastedLinear`, the weight is rounded to the activation dtype (autocast's dtype when autocast is on).
    Up to FUSED_MAX_ROWS activation rows without LQER, salient groups or rotation use the fused kernel; otherwise
    the weight is dequantized (Triton on CUDA, torch elsewhere, a rotation undone after it) and multiplied by
    F.linear."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        packed, bits, layout, shape, scales, lqer, salient, self.rotation = weight
        self.bits, self.layout, self.shape, self.backend = bits, layout, tuple(int(d) for d in shape), backend
        if len(self.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight shape (out, in), got {self.shape}")
        self.out_features, self.in_features = self.shape
        check_packed(packed, parse_layout(bits, layout), self.shape)
        check_scales(scales, self.shape)
        if lqer is not None:
            check_lqer(lqer, self.shape)
        if self.rotation is not None:
            check_rotation(self.rotation, self.shape)
        # Float buffers are kept as integer bit patterns so that model.to(dtype) cannot re-round them.
        self.register_buffer("packed", packed)
        self.register_buffer("scale_bits", scales.view(torch.int16))
        self.register_buffer("lqer_a_bits", None if lqer is None else lqer[0].contiguous().view(torch.int32))
        self.register_buffer("lqer_b_bits", None if lqer is None else lqer[1].contiguous().view(torch.int32))
        # salient column groups: their columns, and their codes as a packed weight of its own (bits, layout, shape)
        self.salient_format = None if salient is None else salient[1][1:4]
        self.register_buffer("salient_cols", None if salient is None else salient[0])
        self.register_buffer("salient_packed", None if salient is None else salient[1].packed)
        self.register_buffer("salient_scale_bits", None if salient is None else salient[1].scales.view(torch.int16))
        self.bias = bias

    @property
    def scales(self) -> torch.Tensor:
        return self.scale_bits.view(torch.float16)

    @property
    def lqer(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.lqer_a_bits is None:
            return None
        return self.lqer_a_bits.view(torch.float32), self.lqer_b_bits.view(torch.float32)

    @property
    def packed_weight(self) -> PackedWeight:
        salient = None
        if self.salient_format is not None:
            sub = PackedWeight(self.salient_packed, *self.salient_format, self.salient_scale_bits.view(torch.float16))
            salient = (self.salient_cols, sub)
        return PackedWeight(self.packed, self.bits, self.layout, self.shape, self.scales, self.lqer, salient,
                            self.rotation)

    def extra_repr(self) -> str:
        rank = 0 if self.lqer_a_bits is None else self.lqer_a_bits.shape[1]
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"layout={self.layout}, lqer_rank={rank}, rotation={self.rotation}, bias={self.bias is not None}")

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed_weight.dequantize(dtype, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x2 = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if (self.lqer_a_bits is None and self.salient_format is None and self.rotation is None
                and x2.shape[0] <= FUSED_MAX_ROWS):
            y = dequant_matmul(x2, self.packed, self.bits, self.layout, self.shape, self.scales, self.backend)
            y = y if bias is None else y + bias
        else:
            y = F.linear(x2, self.dequantized_weight(x.dtype), bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def swap_linears(model: nn.Module, packed_weights: dict[str, PackedWeight], backend: str = "auto") -> nn.Module:
    """Replace, in place, every nn.Linear whose '<module name>.weight' is a key of `packed_weights` by a
    QuantLinear on the Linear's device (keeping its bias). Keys naming other tensors are left alone."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and f"{name}.weight" in packed_weights]
    for name, linear in targets:
        weight = packed_weights[f"{name}.weight"]
        if tuple(int(d) for d in weight.shape) != tuple(linear.weight.shape):
            raise ValueError(f"packed weight {name}.weight has shape {tuple(weight.shape)}, "
                             f"the model's is {tuple(linear.weight.shape)}")
        quant = QuantLinear(weight, linear.bias, backend)
        quant.to(linear.weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quant)
    return model
