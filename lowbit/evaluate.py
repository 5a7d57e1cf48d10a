"""Perplexity in the GPTQ convention, and dense stand-ins for fast fake-quantized evaluation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit import reference
from lowbit.blocks import input_device
from lowbit.convert import set_submodule
from lowbit.data import token_stream
from lowbit.nn import QuantLinear


def perplexity(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    seqlen: int = 2048,
    max_windows: int | None = None,
    *,
    progress: bool = True,
) -> float:
    """exp(mean token negative log-likelihood) of `texts`, in the GPTQ convention.

    The texts are joined with a blank line and tokenized once (`lowbit.data.token_stream`:
    no BOS token anywhere, whatever the tokenizer's default), then scored by
    `token_perplexity` in non-overlapping windows of `seqlen` tokens.
    """
    return token_perplexity(model, token_stream(tokenizer, texts), seqlen, max_windows, progress=progress)


@torch.inference_mode()
def token_perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    *,
    progress: bool = True,
) -> float:
    """Perplexity of a token stream LongTensor[T]: it is cut into windows of `seqlen`
    tokens (the incomplete tail is dropped; `max_windows` keeps the first ones), each
    window is scored on its own, and every token but the first of each window is
    predicted, so the mean runs over windows * (seqlen - 1) tokens."""
    if tokens.dim() != 1:
        raise ValueError(f"lowbit: tokens must be a 1-D stream, got shape {list(tokens.shape)}")
    if seqlen < 2:
        raise ValueError(f"lowbit: seqlen must be at least 2, got {seqlen}")
    windows = tokens.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise ValueError(f"lowbit: {tokens.numel()} tokens are fewer than one window of {seqlen}")
    device = input_device(model)
    total = 0.0
    for i in tqdm(range(windows), desc="perplexity", unit="window", disable=not progress, leave=False):
        ids = tokens[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        total += F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
    return math.exp(total / (windows * (seqlen - 1)))


def dense_linear(layer: QuantLinear) -> nn.Linear:
    """An nn.Linear holding the weights of a QuantLinear, s * (q - z) computed in fp32 by
    the pure-torch reference (any device, no kernel needed)."""
    weight = reference.dequantize(layer.packed, layer.scales.float(), layer.zeros.float(), layer.bits,
                                  layer.group_size)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      device=weight.device, dtype=torch.float32)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias.float())
    return dense.requires_grad_(False)


@contextlib.contextmanager
def dense_weights(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily replaces every QuantLinear in `module` by a dense fp32 nn.Linear with
    the same dequantized weights: the same model, computed by dense matmuls. For fast
    fake-quantized evaluation where no fast kernel is available; results match the
    packed kernels up to floating-point summation order."""
    quantized = {name: m for name, m in module.named_modules() if isinstance(m, QuantLinear) and name}
    try:
        for name, layer in quantized.items():
            set_submodule(module, name, _DtypeFollowing(dense_linear(layer)))
        yield module
    finally:
        for name, layer in quantized.items():
            set_submodule(module, name, layer)


class _DtypeFollowing(nn.Module):
    """Computes in fp32 and returns the input's dtype, like QuantLinear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.float()).to(x.dtype)
