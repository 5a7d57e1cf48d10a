"""`QuantLinear`: a drop-in replacement for `torch.nn.Linear` with 2/3/4-bit weights."""

from __future__ import annotations

import torch
from torch import nn

from lowbit import ops, quantizer


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The [out_features, in_features] weight of an nn.Linear or a Conv1D."""
    return module.weight.T if is_conv1d(module) else module.weight


class QuantLinear(nn.Module):
    """y = x @ W^T + bias with W stored as packed b-bit codes and per-group scales and zeros.

    Buffers (the `state_dict`, in the canonical layout of docs/FORMAT.md):
      packed  int32 [out_features, in_features * bits / 32]
      scales  [out_features, in_features / group_size], dtype `dtype`
      zeros   like scales; W = scales * (codes - zeros) per group
      bias    [out_features], dtype `dtype` (optional)

    The weight is frozen: autograd reaches x (and a bias that requires grad),
    never the quantized weight. Inputs may be float32, float16 or bfloat16;
    the output has the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None = 64,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        ops.check_bits(bits)
        ops.check_in_features(in_features)
        group_size = quantizer.resolve_group_size(group_size, in_features)
        ops.check_group_size(group_size, in_features)
        if dtype not in ops.FLOAT_DTYPES:
            raise TypeError(f"lowbit: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = in_features // group_size
        words = ops.words_per_row(in_features, bits)
        self.register_buffer("packed", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        bits: int,
        group_size: int | None = 64,
        scale_dtype: torch.dtype | None = None,
    ) -> QuantLinear:
        """Round-to-nearest (asymmetric min-max per group) quantization of an nn.Linear
        (or a transformers Conv1D). Scales default to fp16 (bf16 for bf16 weights)."""
        codes, scales, zeros = quantizer.rtn(linear_weight(linear).detach(), bits, group_size, scale_dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_quantized(codes, scales, zeros, bias, bits=bits, group_size=group_size)

    @classmethod
    def from_quantized(
        cls,
        codes_or_packed: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        bits: int,
        group_size: int | None,
    ) -> QuantLinear:
        """Builds a layer from codes (uint8 [N, K]) or packed words (int32), e.g. from calibration."""
        ops.check_bits(bits)
        if codes_or_packed.dtype == torch.uint8:
            packed = ops.pack(codes_or_packed, bits)
            in_features = codes_or_packed.shape[1]
        elif codes_or_packed.dtype == torch.int32:
            packed = codes_or_packed
            in_features = ops._in_features_of(packed, bits)
        else:
            raise TypeError(
                "lowbit: from_quantized takes uint8 codes or int32 packed words, got "
                f"{codes_or_packed.dtype}"
            )
        group_size = quantizer.resolve_group_size(group_size, in_features)
        layer = cls(
            in_features, packed.shape[0], bits, group_size, bias is not None,
            dtype=scales.dtype, device=packed.device,
        )
        state = {"packed": packed, "scales": scales, "zeros": zeros}
        if bias is not None:
            state["bias"] = bias
        layer.load_state_dict(state)
        return layer

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scales", "zeros", "bias"):
            t = state_dict.get(prefix + name)
            if t is not None and t.is_floating_point():
                quantizer.check_finite(t, f"{prefix}{name}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.packed, self.scales, self.zeros, self.bits, self.group_size, self.bias)

    def dequantize(self) -> torch.Tensor:
        """The weight W[out_features, in_features] in the scales' dtype."""
        return ops.dequantize(self.packed, self.scales, self.zeros, self.bits, self.group_size)

    def codes(self) -> torch.Tensor:
        """The integer codes, uint8 [out_features, in_features]."""
        return ops.unpack(self.packed, self.bits, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, dtype={self.scales.dtype}"
        )
