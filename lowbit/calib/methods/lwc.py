"""Learnable weight clipping (LWC, OmniQuant): the fake-quantized linear layer that
OmniQuant-style methods train.

Per group of `group_size` inputs of one output row, with raw clip logits (u, l):

    hi = sigmoid(u) * max(W_g, 0)        lo = sigmoid(l) * min(W_g, 0)
    s  = clamp((hi - lo) / (2^b - 1), 1e-5, 1e4), rounded to the storage dtype
    z  = round(-lo / s)                  (no gradient)
    q  = clamp(round_ste(W_g / s) + z, 0, 2^b - 1)
    W^ = s * (q - z)

`round_ste` rounds forward and passes gradients unchanged backward, so u and l
learn through s. Two choices differ from OmniQuant's code and make the export exact:

- the range always contains 0 (as lowbit's round-to-nearest), so z is an integer in
  [0, 2^b - 1] and the layer exports losslessly to GPTQ-style integer zeros; only a
  group whose weights all share one sign is affected;
- s is rounded to the storage dtype (fp16 by default) in the forward pass (straight
  through backward), and so is the bias, so the layer trained here computes exactly
  what the exported QuantLinear computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import UsageError
from lowbit.nn import QuantLinear, linear_weight
from lowbit.quant.grid import SCALE_FLOOR, check_finite, codes_for, grouped

SCALE_MAX = 1e4


def check_clip_init(value: float | None) -> None:
    """The `clip_init` setting of the clipping methods: a finite logit."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise UsageError(f"lowbit: clip_init must be a finite number, got {value!r}")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


class _FakeQuantize(torch.autograd.Function):
    """W^ = s * (clamp(round(w / s) + z, 0, maxq) - z) with the straight-through rounding,
    fused: autograd of the composed ops costs ~20 elementwise passes over the weight;
    this saves one coefficient tensor and reduces it per group on the way back.

    d W^ / d s = round(w / s) - w / s   where 0 < round(w / s) + z < maxq
               = q - z                  elsewhere (clamped, or on a bound: torch.clamp's
                                        gradient, hence OmniQuant's, is zero there too)
    (w and z get no gradient: the weight is frozen, the zero is rounded).
    """

    @staticmethod
    def forward(ctx, w, s, z, maxq):
        # In place where possible: these passes over the weight run at every step.
        x = w / s
        q = torch.round(x)
        coefficient = x.neg_().add_(q)          # round(w / s) - w / s
        q.add_(z)                               # the unclamped code
        inside = (q > 0) & (q < maxq)
        q.clamp_(0, maxq).sub_(z)               # q - z
        ctx.save_for_backward(torch.where(inside, coefficient, q))
        return q.mul_(s)

    @staticmethod
    def backward(ctx, grad):
        (coefficient,) = ctx.saved_tensors
        return None, (grad * coefficient).sum(-1, keepdim=True), None, None


def fake_quantize(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    """Fake-quantized grouped weights w [out, groups, g] with scales and zeros [out, groups, 1];
    differentiable in s (straight-through rounding)."""
    return _FakeQuantize.apply(w, s, z, maxq)


def cast_ste(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to `dtype` (kept in x's dtype) forward, identity backward."""
    if dtype == x.dtype:
        return x
    return x + (x.to(dtype).to(x.dtype) - x).detach()


class ClippedLinear(nn.Module):
    """Stand-in for a linear layer during calibration: the frozen original `linear` with
    its weight fake-quantized under learnable clipping (`upper`, `lower`: logits of
    shape [out_features, groups, 1], initialised at `init`; sigmoid(4) = 0.982)."""

    def __init__(self, linear: nn.Module, bits: int, group_size: int, scale_dtype: torch.dtype,
                 init: float = 4.0, compensated: bool = False):
        super().__init__()
        self.linear = linear
        for p in linear.parameters():
            p.requires_grad_(False)
        self.bits, self.group_size, self.scale_dtype = bits, group_size, scale_dtype
        w = grouped(self.original_weight(), group_size)
        check_finite(w, "weight")
        # Derived from the frozen weight, so not part of the learned (checkpointed) state.
        self.register_buffer("wmax", w.amax(-1, keepdim=True).clamp(min=0), persistent=False)
        self.register_buffer("wmin", w.amin(-1, keepdim=True).clamp(max=0), persistent=False)
        shape = (w.shape[0], w.shape[1], 1)
        self.upper = nn.Parameter(torch.full(shape, float(init), device=w.device))
        self.lower = nn.Parameter(torch.full(shape, float(init), device=w.device))
        # With GPTQ (lowbit.calib.gptq): the weight that is rounded instead of the original,
        # learned state like the clip logits. The grid (wmax, wmin) stays the original's.
        self.register_buffer("compensated", self.original_weight().clone() if compensated else None)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def original_weight(self) -> torch.Tensor:
        """The frozen weight of the original layer, float32 [out_features, in_features]."""
        return linear_weight(self.linear).detach().float()

    def weight_to_round(self) -> torch.Tensor:
        """The GPTQ-compensated weight if set, else the original, float32 [out, in]."""
        return self.original_weight() if self.compensated is None else self.compensated

    def set_compensated(self, weight: torch.Tensor) -> None:
        if self.compensated is None:
            raise ValueError("this stand-in was built without room for a compensated weight")
        self.compensated.copy_(weight)

    def grouped_weight(self) -> torch.Tensor:
        """The weight to round, float32 [out_features, groups, group_size]."""
        return grouped(self.weight_to_round(), self.group_size)

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales (differentiable in the clip logits) and integer zeros, [out, groups, 1]."""
        hi = torch.sigmoid(self.upper) * self.wmax
        lo = torch.sigmoid(self.lower) * self.wmin
        s = ((hi - lo) / self.maxq).clamp(min=SCALE_FLOOR, max=SCALE_MAX)
        s = cast_ste(s, self.scale_dtype)
        z = torch.round(-lo.detach() / s.detach()).clamp(0, self.maxq)
        return s, z

    def fake_weight(self) -> torch.Tensor:
        """The fake-quantized weight W^ [out_features, in_features], float32."""
        s, z = self.scales_zeros()
        w = self.grouped_weight()
        return fake_quantize(w, s, z, self.maxq).reshape(w.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.linear.bias
        if bias is not None:  # QuantLinear stores the bias in the scales' dtype
            bias = bias.detach().to(self.scale_dtype).to(x.dtype)
        weight = self.fake_weight() if torch.is_grad_enabled() else self._frozen_fake_weight()
        return F.linear(x, weight.to(x.dtype), bias)

    def _frozen_fake_weight(self) -> torch.Tensor:
        """fake_weight() without gradients, kept while no parameter or buffer of this
        stand-in changes (the engine's evaluation passes run it once per window)."""
        versions = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))
        cached = self.__dict__.get("_frozen")
        if cached is None or cached[0] != versions:
            cached = (versions, self.fake_weight())
            self.__dict__["_frozen"] = cached
        return cached[1]

    @torch.no_grad()
    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 [out, in], scales [out, groups], zeros [out, groups]) in the storage
        dtype: exactly the weights of `fake_weight`."""
        s, z = self.scales_zeros()
        scales = s.squeeze(-1).to(self.scale_dtype)
        zeros = z.squeeze(-1).to(self.scale_dtype)
        codes = codes_for(self.weight_to_round(), scales, zeros, self.bits)
        return codes, scales, zeros

    def to_quant_linear(self) -> QuantLinear:
        """The exported layer, on the device of the original one (packed on the CPU)."""
        codes, scales, zeros = self.quantized()
        bias = self.linear.bias
        layer = QuantLinear.from_quantized(
            codes.cpu(), scales.cpu(), zeros.cpu(), None if bias is None else bias.detach().cpu(),
            bits=self.bits, group_size=self.group_size,
        )
        return layer.to(codes.device)

    def clip_parameters(self) -> list[nn.Parameter]:
        return [self.upper, self.lower]
