"""Decoder blocks of Hugging Face causal LMs: finding them, capturing their inputs, running them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.errors import UsageError

# Where the decoder blocks live: Llama, Mistral, Qwen2, SmolLM, OPT (and GPT-2,
# GPT-NeoX-style models, whose blocks follow the same calling convention).
BLOCK_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder blocks."""
    for path in BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    raise UsageError(
        f"lowbit: cannot find the decoder blocks of {type(model).__name__}; supported are "
        "Hugging Face causal LMs of the Llama family (Llama, Mistral, Qwen2, SmolLM: "
        "`model.layers`) and OPT (`model.decoder.layers`)"
    )


@dataclass
class BlockCall:
    """The arguments a block receives besides its hidden states (attention mask,
    position ids or rotary embeddings, cache flags), recorded for a batch of one window:
    they broadcast over any batch size."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> BlockCall:
        memo: dict[int, Any] = {}
        return BlockCall(_move(self.args, device, memo), _move(self.kwargs, device, memo))


def _move(obj: Any, device, memo: dict[int, Any]) -> Any:
    """`obj` with every tensor moved to `device`; a tensor shared by several entries stays shared."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_move(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """The block's output hidden states (blocks return a tensor or a tuple starting with one)."""
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _Stop(Exception):
    """Ends a forward pass once the block inputs are recorded."""


def input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor
) -> tuple[torch.Tensor, list[BlockCall]]:
    """Runs the model on each window of `tokens` [n, seqlen] up to its first block.

    Returns the hidden states entering block 0, [n, seqlen, hidden] on the CPU, and
    the `BlockCall` of every block: the keyword arguments differ between blocks in
    some models (Qwen2 gives sliding-window layers their own mask). The blocks do not
    compute during capture: each one is replaced for the pass by a recorder that
    passes its input through, and the last one ends the pass.
    """
    device = input_device(model)
    calls: list[BlockCall | None] = [None] * len(blocks)
    inputs = []

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if calls[index] is None:
                calls[index] = BlockCall(args[1:], dict(kwargs)).to("cpu")
            if index == 0:
                inputs.append(hidden.detach().to("cpu"))
            if index == len(blocks) - 1:
                raise _Stop
            return hidden
        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        for window in tokens:
            try:
                model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward
    if len(inputs) != len(tokens) or any(c is None for c in calls):
        raise RuntimeError(
            f"lowbit: {type(model).__name__} did not call all of its decoder blocks in order; "
            "block-wise calibration cannot follow its data flow"
        )
    return torch.cat(inputs), calls


def batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Index batches over n items: in order without a generator, else an endless stream
    of shuffled epochs."""
    if generator is None:
        for start in range(0, n, batch_size):
            yield torch.arange(start, min(start + batch_size, n))
        return
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]
