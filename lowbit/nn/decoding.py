"""How a model decodes, for `lowbit generate` and the speed report of `lowbit quantize`: the
lean path where it covers the model (`lowbit.nn.lean_decode`), else transformers'
`generate`, either with the lm_head chosen for decoding (`lowbit.nn.lm_head`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import UsageError
from lowbit.nn.lean_decode import LeanDecoder, greedy, lean_unsupported
from lowbit.nn.lm_head import decoding_lm_head, describe_lm_head

DECODE_PATHS = ("lean", "transformers")
DEFAULT_LM_HEAD = "q4t"


class Decoding:
    """Generation for one model: `path` "lean" falls back to transformers' generate (saying
    why in `fallback_reason`) for models the lean path does not cover."""

    def __init__(self, model: nn.Module, path: str = "lean", lm_head: str = DEFAULT_LM_HEAD):
        if path not in DECODE_PATHS:
            raise UsageError(f"lowbit: unknown decoding path {path!r}; choose one of {', '.join(DECODE_PATHS)}")
        self.model = model
        self.head = decoding_lm_head(model.lm_head, lm_head)
        self.fallback_reason = lean_unsupported(model) if path == "lean" else None
        self.lean = LeanDecoder(model, self.head) if path == "lean" and self.fallback_reason is None else None

    def generate(self, ids: torch.Tensor, config, streamer=None) -> torch.Tensor:
        """ids [1, n] and their continuation under a transformers GenerationConfig (its
        max_new_tokens, do_sample, temperature, top_k, top_p and eos_token_id)."""
        if self.lean is None:
            with using_lm_head(self.model, self.head), torch.inference_mode():
                return self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                           streamer=streamer)
        eos = config.eos_token_id
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        choose = sampler(config) if config.do_sample else greedy
        return self.lean.generate(ids, config.max_new_tokens, choose, eos, streamer)

    def describe(self) -> str:
        """A few words for reports: the path, its fused projections and the lm_head."""
        head = describe_lm_head(self.head)
        if self.lean is not None:
            return f"lean path ({self.lean.fused_projections} fused projections, {head})"
        why = f": {self.fallback_reason}" if self.fallback_reason else ""
        return f"transformers' generate{why} ({head})"


@contextlib.contextmanager
def using_lm_head(model: nn.Module, head: nn.Module) -> Iterator[None]:
    """Runs a block with `head` as the model's lm_head, then puts the model's own back."""
    own = model.lm_head
    model.lm_head = head
    try:
        yield
    finally:
        model.lm_head = own


def sampler(config):
    """Sampling as transformers' generate does it: temperature, top-k, then top-p warpers,
    one multinomial draw from the softmax."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))

    def choose(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(F.softmax(warpers(ids, logits), dim=-1), num_samples=1)[:, 0]

    return choose
