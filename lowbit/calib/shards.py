"""Where the weights of the model being calibrated live: in memory, or in the safetensors
shards of a model directory, loaded one decoder block at a time.

The engine calls the same hooks either way: `load_block` before a block's turn and
`release_block` after it, `load_outside` / `release_outside` around the parts outside the
blocks (embeddings, final norm, head), and `digest` for the resume manifest. In memory
they do nothing. From shards, a block's tensors are read, checked and cast to the
model's dtype when its turn comes; once calibrated, its exported tensors are written to
a file of their own (`staged_block`) and the block goes back to the meta device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.calib.resume import model_digest
from lowbit.io.files import SafetensorsCheckpoint, save_tensors, write_atomic
from lowbit.io.validate import check_finite, check_tensor_header, tied_targets


class ResidentWeights:
    """Every weight is in memory already: the hooks do nothing."""

    def digest(self, model: nn.Module) -> str:
        return model_digest(model)

    def load_block(self, index: int, block: nn.Module) -> None:
        pass

    def release_block(self, index: int, block: nn.Module) -> None:
        pass

    def load_outside(self, model: nn.Module) -> None:
        pass

    def release_outside(self, model: nn.Module) -> None:
        pass


class ShardedWeights(ResidentWeights):
    """The weights of `model` (a skeleton whose parameters are on the meta device) in the
    checked safetensors files `reader`; `prefix` names the decoder blocks. With `staging`,
    each released block's tensors are written to `staging/block_NNNN.safetensors`."""

    def __init__(self, model: nn.Module, reader: SafetensorsCheckpoint, prefix: str, staging: Path | None):
        self.model, self.reader, self.prefix, self.staging = model, reader, prefix, staging
        self.expected = model.state_dict()
        self.tie_source = dict(getattr(model, "all_tied_weights_keys", None) or {})
        if staging is not None:
            staging.mkdir(parents=True, exist_ok=True)

    def tensor(self, name: str) -> torch.Tensor:
        """A stored tensor (a tie's source for a tied name), checked and cast to the model's dtype."""
        key = self.tie_source[name] if name not in self.reader and name in self.tie_source else name
        ref = self.expected[name]
        if key not in self.reader and not ref.is_meta:  # a buffer the model makes itself
            return ref
        t = self.reader[key]
        self.reader.close()  # its mapped pages would otherwise count as resident memory, shard by shard
        check_tensor_header(key, t.dtype, tuple(t.shape), ref, self.model, str(self.reader.path))
        check_finite(key, t, str(self.reader.path))
        return t.to(ref.dtype)

    def digest(self, model: nn.Module) -> str:
        return model_digest(model, ((name, self.tensor(name)) for name in self.expected))

    def _assign(self, module: nn.Module, prefix: str, names: list[str]) -> None:
        state = {name: self.tensor(prefix + name) for name in names}
        module.load_state_dict(state, strict=False, assign=True)

    def load_block(self, index: int, block: nn.Module) -> None:
        self._assign(block, f"{self.prefix}.{index}.", list(block.state_dict()))

    def release_block(self, index: int, block: nn.Module) -> None:
        if self.staging is not None:
            prefix = f"{self.prefix}.{index}."
            tensors = {prefix + k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
            write_atomic(self.staged_block(index), lambda p: save_tensors(tensors, p))
        block.to("meta")

    def staged_block(self, index: int) -> Path:
        return self.staging / f"block_{index:04d}.safetensors"

    def _outside_names(self, model: nn.Module) -> list[str]:
        tied = tied_targets(model)
        return [k for k, t in model.state_dict().items()
                if not k.startswith(self.prefix + ".") and t.is_meta and k not in tied]

    def load_outside(self, model: nn.Module) -> None:
        self._assign(model, "", self._outside_names(model))
        if self.tie_source:
            model.tie_weights()

    def release_outside(self, model: nn.Module) -> None:
        inside = {id(m) for m in model.get_submodule(self.prefix).modules()}
        for module in model.modules():
            if id(module) in inside:
                continue
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad))
        if self.tie_source:
            model.tie_weights()
