"""Tensor-level uniform quantization: w = s * (q - z) per group along K."""

from __future__ import annotations

import torch

from lowbit.errors import UsageError
from lowbit.format import check_bits, check_group_size, check_in_features, resolve_group_size

SCALE_FLOOR = 1e-5  # smallest scale: keeps w / s finite for constant groups


def default_scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """16-bit scales: bf16 for bf16 weights (fp16 could overflow), fp16 otherwise."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float16


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise UsageError(f"lowbit: {what} contains NaN or Inf values")


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, K / group_size, group_size] (a view)."""
    n, k = w.shape
    return w.reshape(n, k // group_size, group_size)


def codes_for(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes q = clamp(round(w / s) + z, 0, 2^bits - 1) for given scales and zeros."""
    g = w.shape[1] // scales.shape[1]
    s = scales.float().unsqueeze(-1)
    z = zeros.float().unsqueeze(-1)
    q = torch.round(grouped(w.float(), g) / s) + z
    return q.clamp(0, 2**bits - 1).reshape(w.shape).to(torch.uint8)


def minmax_scales_zeros(
    w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max scales and integer zeros per group.

    The range always contains 0 (as in GPTQ), so the integer zero lies in
    [0, 2^bits - 1] and every group is exactly representable in GPTQ format.
    """
    wg = grouped(w.float(), group_size)
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    maxq = 2**bits - 1
    scales = ((hi - lo) / maxq).clamp(min=SCALE_FLOOR).to(scale_dtype)
    zeros = torch.round(-lo / scales.float()).clamp(0, maxq).to(scale_dtype)
    return scales, zeros


def rtn(
    w: torch.Tensor, bits: int, group_size: int | None, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest with min-max ranges: returns (codes uint8, scales, zeros)."""
    check_bits(bits)
    if w.dim() != 2:
        raise UsageError(f"lowbit: weight must be 2-D [out_features, in_features], got {list(w.shape)}")
    check_in_features(w.shape[1])
    group_size = resolve_group_size(group_size, w.shape[1])
    check_group_size(group_size, w.shape[1])
    check_finite(w, "weight")
    scale_dtype = scale_dtype or default_scale_dtype(w.dtype)
    scales, zeros = minmax_scales_zeros(w, bits, group_size, scale_dtype)
    check_finite(scales, f"the {scale_dtype} scales of this weight (try scale_dtype=torch.float32)")
    return codes_for(w, scales, zeros, bits), scales, zeros
