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

Users of S decide its scale; `apiq` normalises it per block (lowbit.methods.apiq).

Memory: the squared gradients are accumulated by hooks that run as soon as each
weight's gradient is ready and then free it, so one pass holds S for the blocks it
covers plus one layer's gradient. With `blocks_per_pass`, the blocks are covered a
few at a time (one pass over the data per group of blocks): for models whose S does
not fit in memory at once. Finished blocks are on disk: a second call with the same
directory, model and data skips them (resume after an interruption).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.blocks import decoder_blocks, input_device
from lowbit.convert import linear_layers
from lowbit.data import calibration_windows, check_tokens
from lowbit.nn import linear_weight
from lowbit.resume import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    _write_atomic,
    model_digest,
    tensor_digest,
)

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
    tokens = _tokens(model, calibration, tokenizer, nsamples, seqlen, seed)
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


def _tokens(model, calibration, tokenizer, nsamples, seqlen, seed) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    if isinstance(calibration, torch.Tensor):
        tokens = calibration.cpu()
    else:
        if tokenizer is None:
            raise ValueError("lowbit: calibration texts need a tokenizer")
        if nsamples < 1 or seqlen < 2:
            raise ValueError("lowbit: nsamples must be >= 1 and seqlen >= 2")
        tokens = calibration_windows(tokenizer, calibration, nsamples, seqlen, seed)
    check_tokens(tokens, vocab)
    if tokens.shape[1] < 2:
        raise ValueError("lowbit: saliency windows need at least 2 tokens")
    return tokens


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
    path = Path(directory).expanduser() / f"block_{block_index:04d}.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"lowbit: no saliency for block {block_index} in {directory}; run lowbit.compute_saliency "
            "there first (or pass saliency=True)"
        )
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise CorruptCheckpointError(f"lowbit: cannot read {path}: {exc}; delete it and recompute") from exc


class SaliencyStore:
    """A saliency directory, checked against the digests of the model and the data."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, str], num_blocks: int):
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "kind": "saliency", "num_blocks": num_blocks, "fingerprint": fingerprint}
        path = self.directory / "manifest.json"
        if path.exists():
            try:
                found = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise CorruptCheckpointError(f"lowbit: cannot read {path}: {exc}; delete the directory") from exc
            if found != manifest:
                raise CheckpointMismatchError(
                    f"lowbit: the saliency in {self.directory} was computed for another model or other "
                    "calibration data; use another directory or delete this one"
                )
        else:
            _write_atomic(path, lambda p: p.write_text(json.dumps(manifest, indent=2)))

    def block_path(self, index: int) -> Path:
        return self.directory / f"block_{index:04d}.safetensors"

    def has_block(self, index: int) -> bool:
        return self.block_path(index).exists()

    def save_block(self, index: int, saliency: dict[str, torch.Tensor]) -> None:
        _write_atomic(self.block_path(index), lambda p: save_file(saliency, str(p)))
