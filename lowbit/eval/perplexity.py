"""Perplexity in the GPTQ convention, and the divergence of a quantized model from its
full-precision reference (KL divergence, top-1 agreement, perplexity ratio)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

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
    return evaluate_tokens(model, tokens, seqlen, max_windows, progress=progress).perplexity


@dataclass
class Evaluation:
    """A model's perplexity on some windows and, against a reference model (the full-precision
    one) on the same windows, the divergence of its next-token distributions: KL(reference ||
    model) per predicted token (mean, median, 99th percentile, in nats), how often both rank
    the same token first, and the perplexity ratio."""

    windows: int
    seqlen: int
    perplexity: float
    reference_perplexity: float | None = None
    kl_mean: float | None = None
    kl_median: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None

    @property
    def perplexity_ratio(self) -> float | None:
        return None if self.reference_perplexity is None else self.perplexity / self.reference_perplexity

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "perplexity_ratio": self.perplexity_ratio}


def evaluate(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    seqlen: int = 2048,
    max_windows: int | None = None,
    *,
    reference: nn.Module | None = None,
    progress: bool = True,
) -> Evaluation:
    """`perplexity` and, with a `reference` model, the KL divergence, top-1 agreement and
    perplexity ratio against it, on the same windows (`evaluate_tokens`)."""
    return evaluate_tokens(model, token_stream(tokenizer, texts), seqlen, max_windows,
                           reference=reference, progress=progress)


@torch.inference_mode()
def evaluate_tokens(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    *,
    reference: nn.Module | None = None,
    progress: bool = True,
) -> Evaluation:
    """`Evaluation` of a token stream, windowed as `token_perplexity` describes; the reference
    (if any) scores each window right after the model, on its own device."""
    windows = _window_count(tokens, seqlen, max_windows)
    nll = reference_nll = 0.0
    kl, agree = [], 0
    for i in tqdm(range(windows), desc="evaluating", unit="window", disable=not progress, leave=False):
        ids = tokens[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
        logits = _logits(model, ids)
        targets = ids[0, 1:].to(logits.device)
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        if reference is None:
            continue
        ref_logits = _logits(reference, ids).to(logits.device)
        reference_nll += F.cross_entropy(ref_logits, targets, reduction="sum").item()
        kl.append(token_kl(ref_logits, logits))
        agree += (ref_logits.argmax(-1) == logits.argmax(-1)).sum().item()
    predicted = windows * (seqlen - 1)
    result = Evaluation(windows, seqlen, math.exp(nll / predicted))
    if reference is not None:
        per_token = torch.cat(kl).double().numpy()
        result.reference_perplexity = math.exp(reference_nll / predicted)
        result.kl_mean = float(per_token.mean())
        result.kl_median, result.kl_p99 = (float(v) for v in np.percentile(per_token, [50, 99]))
        result.top1_agreement = agree / predicted
    return result


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """KL(softmax(ref_logits) || softmax(logits)) per row, on the CPU. In float64: a small
    KL is a sum of nearly cancelling terms, which float32 leaves about 1e-4 off; `chunk`
    rows at a time bound the float64 copies of a large vocabulary."""
    rows = []
    for start in range(0, logits.shape[0], chunk):
        log_p = F.log_softmax(ref_logits[start : start + chunk].double(), -1)
        log_q = F.log_softmax(logits[start : start + chunk].double(), -1)
        rows.append((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).cpu())
    return torch.cat(rows)


def _window_count(tokens: torch.Tensor, seqlen: int, max_windows: int | None) -> int:
    if tokens.dim() != 1:
        raise UsageError(f"lowbit: tokens must be a 1-D stream, got shape {list(tokens.shape)}")
    if seqlen < 2:
        raise UsageError(f"lowbit: seqlen must be at least 2, got {seqlen}")
    windows = tokens.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise UsageError(f"lowbit: {tokens.numel()} tokens are fewer than one window of {seqlen}")
    return windows


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """float32 logits [seqlen - 1, vocab] predicting tokens 1.. of one window."""
    return model(input_ids=ids.to(input_device(model)), use_cache=False).logits[0, :-1].float()
