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


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W^T + bias, computed in fp32 from the fp32 dequantized weight."""
    y = x.float() @ _weight_f32(packed, scales, zeros, bits, group_size).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
