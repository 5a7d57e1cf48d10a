"""Weight saliency: the diagonal empirical Fisher information of the language-model loss.

For every linear weight W of the decoder blocks,

    S[j, k] = sum over calibration windows n of (dL_n / dW[j, k])^2

where L_n is the mean next-token cross-entropy of window n (the perplexity loss),
computed on the full-precision model with one backward pass per window. S is stored
raw (not normalised) in float32, one safetensors file per decoder block keyed by the
layer's name inside the block ("self_attn.q_proj", ...), in the layout of
SqueezeLLM's chunked gradients:

  manifest.json           digests of the model weights and the calibration tokens
  block_NNNN.safetensors  S of every linear layer of block NNNN

Users of S decide its scale; `apiq` normalises it per block (lowbit.calib.methods.apiq).

Memory: the squared gradients are accumulated by hooks that run as soon as each
weight's gradient is ready and then free it, so one pass holds S for the blocks it
covers plus one layer's gradient. With `blocks_per_pass`, the blocks are covered a
few at a time (one pass over the data per group of blocks): for models whose S does
not fit in memory at once. Finished blocks are on disk: a second call with the same
directory, model and data skips them (resume after an interruption).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.calib.blocks import decoder_blocks, input_device
from lowbit.calib.data import calibration_tokens
from lowbit.calib.resume import BlockStore, model_digest, tensor_digest
from lowbit.errors import CheckpointMismatchError
from lowbit.nn.modules import linear_layers, linear_weight

FORMAT = 1


def compute_saliency(
    model: nn.Module,
    calibration: list[str] | torch.Tensor,
    tokenizer=None,
    out_dir: str | os.PathLike = "saliency",
    *,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    blocks_per_pass: int | None = None,
    progress: bool = True,
) -> Path:
    """Writes the saliency S of every linear weight of the decoder blocks to `out_dir`
    (see the module docstring); returns the directory.

    `calibration` is a list of texts (with `tokenizer`: `nsamples` windows of `seqlen`
    tokens drawn with `seed`, as in `lowbit.quantize`) or a LongTensor [n, seqlen] of
    token ids. `blocks_per_pass` bounds memory (None: all blocks in one pass). The
    model is not changed (its parameters' requires_grad flags are restored).
    """
    tokens = calibration_tokens(model, calibration, tokenizer, nsamples, seqlen, seed)
    _, blocks = decoder_blocks(model)
    store = SaliencyStore(out_dir, {"model": model_digest(model), "data": tensor_digest(tokens)}, len(blocks))
    todo = [i for i in range(len(blocks)) if not store.has_block(i)]
    if not todo:
        return store.directory
    step = blocks_per_pass or len(todo)
    passes = [todo[k : k + step] for k in range(0, len(todo), step)]
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    bar = tqdm(total=len(passes) * len(tokens), desc="saliency", unit="window", disable=not progress)
    try:
        model.eval()  # no dropout
        model.requires_grad_(False)
        for group in passes:
            sums = _accumulate(model, blocks, group, tokens, bar)
            for i in group:
                store.save_block(i, sums[i])
            del sums
    finally:
        bar.close()
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return store.directory


def _accumulate(model, blocks, group, tokens, bar) -> dict[int, dict[str, torch.Tensor]]:
    """One pass over the windows: S of every linear weight of the blocks in `group`."""
    sums: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []

    def accumulate_into(total: torch.Tensor):
        def hook(param: torch.Tensor) -> None:
            total.addcmul_(param.grad.float(), param.grad.float())
            param.grad = None
        return hook

    try:
        for i in group:
            sums[i] = {}
            for local, layer in linear_layers(blocks[i]).items():
                weight = layer.weight  # a Conv1D's S is stored transposed, like linear_weight
                total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                sums[i][local] = total
                weight.requires_grad_(True)
                hooks.append(weight.register_post_accumulate_grad_hook(accumulate_into(total)))
        device = input_device(model)
        for window in tokens:
            ids = window.unsqueeze(0).to(device)
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
                loss = F.cross_entropy(logits.float(), ids[0, 1:])
                loss.backward()
            bar.update(1)
    finally:
        for h in hooks:
            h.remove()
        for i in group:
            for layer in linear_layers(blocks[i]).values():
                layer.weight.requires_grad_(False)
                layer.weight.grad = None
    return {i: {k: _as_linear_layout(blocks[i], k, v) for k, v in layers.items()} for i, layers in sums.items()}


def _as_linear_layout(block: nn.Module, local: str, s: torch.Tensor) -> torch.Tensor:
    """S in the [out_features, in_features] layout of `linear_weight`, on the CPU."""
    layer = block.get_submodule(local)
    return (s.T if linear_weight(layer) is not layer.weight else s).contiguous().cpu()


def load_saliency(directory: str | os.PathLike, block_index: int) -> dict[str, torch.Tensor]:
    """S of the linear layers of one decoder block (local name -> float32 [out, in])."""
    store = SaliencyStore.existing(directory)
    path = store.block_path(block_index)
    if not path.exists():
        raise FileNotFoundError(
            f"lowbit: no saliency for block {block_index} in {directory}; run lowbit.compute_saliency "
            "there first (or pass saliency=True)"
        )
    return store.read_tensors(path)


class SaliencyStore(BlockStore):
    """A saliency directory, checked against the digests of the model and the data."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, str], num_blocks: int):
        super().__init__(directory, {"format": FORMAT, "kind": "saliency", "num_blocks": num_blocks,
                                     "fingerprint": fingerprint})

    @classmethod
    def existing(cls, directory: str | os.PathLike) -> SaliencyStore:
        """A store for reading a directory written before, without checking its manifest."""
        store = cls.__new__(cls)
        store.directory = Path(directory).expanduser()
        return store

    def check_manifest(self, found: dict[str, Any], expected: dict[str, Any]) -> None:
        if found != expected:
            raise CheckpointMismatchError(
                f"lowbit: the saliency in {self.directory} was computed for another model or other "
                "calibration data; use another directory or delete this one"
            )

    def save_block(self, index: int, saliency: dict[str, torch.Tensor]) -> None:
        self.write_tensors(self.block_path(index), saliency)
