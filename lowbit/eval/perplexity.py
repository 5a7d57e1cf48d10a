"""Perplexity in the GPTQ convention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.calib.blocks import input_device
from lowbit.calib.data import token_stream
from lowbit.errors import UsageError


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

    The texts are joined with a blank line and tokenized once (`lowbit.calib.data.token_stream`:
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
        raise UsageError(f"lowbit: tokens must be a 1-D stream, got shape {list(tokens.shape)}")
    if seqlen < 2:
        raise UsageError(f"lowbit: seqlen must be at least 2, got {seqlen}")
    windows = tokens.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise UsageError(f"lowbit: {tokens.numel()} tokens are fewer than one window of {seqlen}")
    device = input_device(model)
    total = 0.0
    for i in tqdm(range(windows), desc="perplexity", unit="window", disable=not progress, leave=False):
        ids = tokens[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        total += F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
    return math.exp(total / (windows * (seqlen - 1)))


