"""Pure-torch reference implementations of every lowbit op.

They define what the kernels compute (docs/FORMAT.md), favour clarity over
speed, and run on any device. Tests compare each kernel against them.
"""

from __future__ import annotations

import torch

from lowbit.format import BLOCK


def _plane_layout(bits: int) -> list[tuple[int, int]]:
    """(plane width, bit shift into the code) of each plane of a packed row."""
    return [(2, 0), (1, 2)] if bits == 3 else [(bits, 0)]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes[N, K] (uint8, < 2**bits) -> packed[N, K * bits / 32] (int32)."""
    n, k = codes.shape
    c = codes.to(torch.int64)
    planes = []
    for width, shift in _plane_layout(bits):
        per = 32 // width
        fields = ((c >> shift) & ((1 << width) - 1)).view(n, k // per, per)
        offsets = torch.arange(per, device=codes.device, dtype=torch.int64) * width
        words = (fields << offsets).sum(-1)  # disjoint fields: the sum is an OR
        planes.append(words)
    packed = torch.cat(planes, dim=1)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)  # uint32 bits as int32


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """packed[N, K * bits / 32] (int32) -> codes[N, K] (uint8)."""
    n, k = packed.shape[0], in_features
    words = packed.to(torch.int64) & 0xFFFFFFFF
    codes = torch.zeros(n, k, dtype=torch.int64, device=packed.device)
    start = 0
    for width, shift in _plane_layout(bits):
        per = 32 // width
        plane = words[:, start : start + k // per]
        offsets = torch.arange(per, device=packed.device, dtype=torch.int64) * width
        fields = (plane.unsqueeze(-1) >> offsets) & ((1 << width) - 1)
        codes |= fields.reshape(n, k) << shift
        start += k // per
    return codes.to(torch.uint8)


def _weight_f32(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    k = packed.shape[1] // bits * BLOCK
    codes = unpack(packed, bits, k).float()
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return (codes - z) * s


def dequantize(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """W = scales * (codes - zeros), per group of `group_size` along K, in the scales' dtype."""
    return _weight_f32(packed, scales, zeros, bits, group_size).to(scales.dtype)


ACT_GROUP = 32  # inputs per scale of the CPU integer path (csrc/include/lowbit/q8.h)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU integer path's 8-bit quantization of x [..., K], bit for bit:
    per group of 32 inputs, d = max|x| / 127 and q = round-half-even(x / d),
    so that x ~ d * q. Returns q (int8, [..., K]) and d (fp32, [..., K / 32]);
    a group holding NaN or Inf gets d = NaN and q = 0."""
    groups = x.float().reshape(*x.shape[:-1], x.shape[-1] // ACT_GROUP, ACT_GROUP)
    amax = groups.abs().amax(-1, keepdim=True)
    d = torch.where(torch.isfinite(amax), amax / 127, torch.nan)
    q = torch.where(d > 0, torch.round(groups / d), 0.0)
    return q.to(torch.int8).reshape(x.shape), d.squeeze(-1)


def dequantize_activations(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """d * q of quantize_activations, in fp32."""
    groups = q.float().reshape(*q.shape[:-1], q.shape[-1] // ACT_GROUP, ACT_GROUP)
    return (groups * d.unsqueeze(-1)).reshape(q.shape)


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    quantize_x: bool = False,
    round_to_bf16: bool = False,
) -> torch.Tensor:
    """y = x @ W^T + bias, computed in fp32 from the fp32 dequantized weight;
    with quantize_x, from x as the CPU integer path sees it (quantize_activations);
    with round_to_bf16, from x and that weight rounded to bf16 (to nearest even),
    as the CPU bf16 kernels see them."""
    xf = dequantize_activations(*quantize_activations(x)) if quantize_x else x.float()
    w = _weight_f32(packed, scales, zeros, bits, group_size)
    if round_to_bf16:
        xf, w = xf.bfloat16().float(), w.bfloat16().float()
    y = xf @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
