"""Token streams from texts, the one tokenization used by calibration and evaluation.

Texts are joined with a blank line ("\\n\\n") and tokenized once, without special
tokens: lowbit inserts no BOS token anywhere, neither at the start of the stream nor
of a window. This is written down because tokenizers disagree (transformers 4.57
prepends `<|im_start|>` as BOS to SmolLM2 text, 5.24 does not) and perplexities move
with it; transformers is pinned in pyproject.toml for the same reason.
"""

from __future__ import annotations

import torch

from lowbit.calib.seeds import derive_seed
from lowbit.errors import UsageError, UsageTypeError

SEPARATOR = "\n\n"


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts joined by a blank line and tokenized without special tokens: LongTensor[T]."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise UsageTypeError("lowbit: texts must be a list of strings")
    if not texts:
        raise UsageError("lowbit: no texts given")
    ids = tokenizer(SEPARATOR.join(texts), add_special_tokens=False, return_tensors="pt").input_ids
    return ids[0].long()


def calibration_windows(
    tokenizer, texts: list[str], nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """`nsamples` windows of `seqlen` consecutive tokens starting at random positions of
    the token stream (GPTQ/OmniQuant style), LongTensor[nsamples, seqlen]."""
    return sample_windows(token_stream(tokenizer, texts), nsamples, seqlen, seed)


def sample_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random positions of a token stream."""
    if stream.numel() <= seqlen:
        raise UsageError(
            f"lowbit: the calibration text has {stream.numel()} tokens, fewer than one "
            f"window of seqlen={seqlen}"
        )
    generator = torch.Generator().manual_seed(derive_seed(seed, "calibration windows"))
    starts = torch.randint(0, stream.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def calibration_tokens(model, calibration: list[str] | torch.Tensor, tokenizer, nsamples: int, seqlen: int,
                       seed: int) -> torch.Tensor:
    """The calibration windows, LongTensor [n, seqlen] on the CPU: `calibration` itself when
    it is a tensor of token ids, else `nsamples` windows of `seqlen` tokens drawn with `seed`
    from its texts; checked against the model's vocabulary."""
    if isinstance(calibration, torch.Tensor):
        tokens = calibration
    else:
        if tokenizer is None:
            raise UsageError("lowbit: calibration texts need a tokenizer")
        if nsamples < 1 or seqlen < 2:
            raise UsageError("lowbit: nsamples must be >= 1 and seqlen >= 2 for calibration")
        tokens = calibration_windows(tokenizer, calibration, nsamples, seqlen, seed)
    check_tokens(tokens, model.get_input_embeddings().num_embeddings)
    if tokens.shape[1] < 2:
        raise UsageError("lowbit: calibration windows need at least 2 tokens")
    return tokens.cpu()


def check_tokens(tokens: torch.Tensor, vocab_size: int | None = None) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
        raise UsageTypeError(
            "lowbit: calibration must be a list of texts (with a tokenizer) or a LongTensor "
            f"[nsamples, seqlen] of token ids, got {type(tokens).__name__}"
            + (f" {tokens.dtype} {list(tokens.shape)}" if isinstance(tokens, torch.Tensor) else "")
        )
    if tokens.numel() == 0:
        raise UsageError("lowbit: the calibration tensor is empty")
    if vocab_size is not None and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise UsageError(f"lowbit: calibration token ids must lie in [0, {vocab_size})")
