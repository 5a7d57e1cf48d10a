"""A lighter output layer for decoding: the model's lm_head read as bfloat16 or as 4-bit codes
(with or without a second 4-bit layer for the first one's rounding error, for every token or
for the most likely ones).

A small model's lm_head is much of what a decoded token reads (SmolLM2-135M: 49152 x 576
fp32, 113 MB, tied to the embedding). These copies are built at load time, for
generation only; the model's own lm_head, its tie to the embedding (which stays for the
lookup) and saved checkpoints are left as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import UsageError
from lowbit.kernels import ops
from lowbit.nn.quant_linear import QuantLinear
from lowbit.quant.grid import rtn

# name -> what it is; "model" keeps the model's own layer
LM_HEAD_CHOICES = {
    "model": "the model's own lm_head",
    "bf16": "a bfloat16 copy of the weight",
    "q4": "4-bit round-to-nearest codes, groups of 32 inputs, fp16 scales and zeros",
    "q4r": "q4 plus a second 4-bit layer coding its rounding error (near-lossless, twice q4's bytes)",
    "q4t": "q4 for every token, q4r for q4's 64 most likely tokens (q4r's choices at q4's bytes)",
}
Q4_GROUP_SIZE = 32
# fp16 scales and zeros: fp32 ones would add a fifth to what the head reads per token,
# and their rounding is far below a 4-bit step (the residual of q4r absorbs it too)
Q4_SCALE_DTYPE = torch.float16
TOP_CANDIDATES = 64  # q4t: the tokens of each row whose logits get q4r's residual


class BFloat16Linear(nn.Module):
    """y = x @ W^T (+ bias) with W stored in bfloat16 and the product in bfloat16;
    y in x's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def residual_layers(weight: torch.Tensor) -> tuple[QuantLinear, QuantLinear]:
    """W1 rounds W to 4 bits, W2 rounds what W1 missed."""
    weight = weight.detach().float()
    layers = []
    for _ in range(2):
        layers.append(QuantLinear.from_quantized(*rtn(weight, 4, Q4_GROUP_SIZE, Q4_SCALE_DTYPE),
                                                 bits=4, group_size=Q4_GROUP_SIZE))
        weight = weight - layers[-1].dense_weight()
    return layers[0], layers[1]


class ResidualQuantLinear(nn.Module):
    """y = x @ (W1 + W2)^T (+ bias), W1 and W2 from `residual_layers`. Both layers' rows are
    stacked into one QuantLinear, so one kernel call reads both."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        first, second = residual_layers(weight)
        self.stacked = QuantLinear.concat_rows([first, second])
        self.out_features = first.out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def dense_weight(self) -> torch.Tensor:
        """W1 + W2, float32."""
        w = self.stacked.dense_weight()
        return w[:self.out_features] + w[self.out_features:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stacked(x)
        y = y[..., :self.out_features] + y[..., self.out_features:]
        return y if self.bias is None else y + self.bias.to(y.dtype)


class TopRefinedQuantLinear(nn.Module):
    """x @ W1^T for every output, and x @ (W1 + W2)^T (ResidualQuantLinear's value) for the
    `candidates` largest outputs of each row of x @ W1^T (+ bias). For an lm_head: q4r's logits
    for the tokens decoding can choose, q4's for the rest, at q4's bytes per token plus the
    candidates' rows of W2. Greedy decoding picks q4r's token unless it lies outside q4's top
    `candidates`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 candidates: int = TOP_CANDIDATES):
        super().__init__()
        self.first, self.second = residual_layers(weight)
        self.candidates = min(candidates, self.first.out_features)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        top = y.topk(self.candidates, dim=-1).indices
        if x.numel() == x.shape[-1]:  # one row (decoding): W2's rows of the candidates only
            rows = top.reshape(-1)
            second = self.second
            refinement = ops.linear(x, second.packed[rows], second.scales[rows], second.zeros[rows],
                                    second.bits, second.group_size)
        else:
            refinement = self.second(x).gather(-1, top)
        y = y.scatter_add(-1, top, refinement)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def decoding_lm_head(head: nn.Module, choice: str) -> nn.Module:
    """The layer to decode with for `choice` (a key of LM_HEAD_CHOICES). A head that is
    already quantized (a QuantLinear, e.g. from an lm_head override) is kept whatever the choice."""
    if choice not in LM_HEAD_CHOICES:
        raise UsageError(f"lowbit: unknown lm_head choice {choice!r}; choose one of {', '.join(LM_HEAD_CHOICES)}")
    if choice == "model" or isinstance(head, QuantLinear):
        return head
    if not isinstance(head, nn.Linear):
        raise UsageError(f"lowbit: lm_head is a {type(head).__name__}; only an nn.Linear can be copied as {choice}")
    if choice == "bf16":
        return BFloat16Linear(head.weight, head.bias)
    if head.in_features % Q4_GROUP_SIZE:
        raise UsageError(f"lowbit: lm_head has {head.in_features} inputs, not a multiple of {Q4_GROUP_SIZE}; "
                         "use another lm_head choice")
    with torch.no_grad():
        if choice == "q4r":
            return ResidualQuantLinear(head.weight, head.bias)
        if choice == "q4t":
            return TopRefinedQuantLinear(head.weight, head.bias)
        return QuantLinear.from_linear(head, bits=4, group_size=Q4_GROUP_SIZE, scale_dtype=Q4_SCALE_DTYPE)


def describe_lm_head(head: nn.Module) -> str:
    """A few words for reports: the head's storage."""
    if isinstance(head, QuantLinear):
        return f"{head.bits}-bit g{head.group_size} lm_head"
    if isinstance(head, ResidualQuantLinear):
        return "4+4-bit residual g32 lm_head"
    if isinstance(head, TopRefinedQuantLinear):
        return f"4-bit g32 lm_head, 4+4-bit for its top {head.candidates}"
    if isinstance(head, BFloat16Linear):
        return "bf16 lm_head"
    weight = getattr(head, "weight", None)
    dtype = str(weight.dtype).removeprefix("torch.") if weight is not None else type(head).__name__
    return f"{dtype} lm_head"
