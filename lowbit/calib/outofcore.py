"""Out-of-core calibration: a model directory quantized with one decoder block in memory.

The model is built on the meta device from its config; its safetensors files are
checked (lowbit.io.validate, the same checks as every load path) before any work. Each
decoder block's weights are read when its turn comes (`lowbit.calib.shards`), and its
exported tensors are written beside the output checkpoint as soon as it is calibrated;
the embeddings, final norm and head are read for the capture and at the end. The
checkpoint is then assembled from those files, one shard at a time, through the same
writer as `save_quantized`, so it is the same checkpoint, byte for byte, as the
in-memory path on the same settings. Peak memory: about one block in full precision plus
the activation streams, whatever the depth (`CalibrationReport.peak_rss`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lowbit.calib import distributed
from lowbit.calib.blocks import decoder_blocks
from lowbit.calib.config import QuantConfig
from lowbit.calib.engine import CalibrationReport, quantize_model
from lowbit.calib.shards import ShardedWeights
from lowbit.errors import CheckpointError, UsageError
from lowbit.io.checkpoint import (
    build_skeleton,
    check_saveable,
    load_tokenizer,
    quantization_config,
    write_checkpoint,
)
from lowbit.io.files import (
    DEFAULT_MAX_SHARD_SIZE,
    SAFETENSORS_DTYPES,
    atomic_directory,
    unique_tensors,
)
from lowbit.io.validate import check_tensors, open_checkpoint

STAGING = ".blocks"  # inside the output being written: each calibrated block's tensors
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def quantize_directory(
    source: str | os.PathLike,
    output: str | os.PathLike | None,
    config: QuantConfig | None = None,
    calibration: list[str] | torch.Tensor | None = None,
    tokenizer=None,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> CalibrationReport:
    """Quantizes the model in directory `source` into the lowbit checkpoint `output`, one
    block in memory at a time, computing in `dtype` (that of `lowbit.assets.load_model`).
    The tokenizer saved beside the weights is used when none is given. In a distributed
    job rank 0 writes the checkpoint."""
    if output is None:
        raise UsageError("lowbit: quantizing a model directory needs output, the checkpoint directory to write")
    if config is not None and config.options.get("saliency") is True:
        raise UsageError("lowbit: saliency=True needs the whole model in memory; compute the saliency first "
                         "(lowbit.compute_saliency) and give its directory")
    source = Path(source).expanduser()
    model, reader = open_model_directory(source, dtype)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
    prefix, _ = decoder_blocks(model)
    reset_peak_rss()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_directory(output)) if distributed.is_main() else None
        weights = ShardedWeights(model, reader, prefix, tmp / STAGING if tmp else None)
        report = quantize_model(model, config, calibration, tokenizer, weights=weights)
        if tmp is not None:
            write_assembled(model, weights, tmp, tokenizer, max_shard_size)
    distributed.barrier()  # the checkpoint is in place for every rank
    report.peak_rss = peak_rss()
    return report


def open_model_directory(source: Path, dtype: torch.dtype):
    """(skeleton on the meta device, checked tensors) of a full-precision model directory."""
    if source.is_dir() and not any(source.glob("*.safetensors")):
        pickles = sorted(p.name for p in source.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"lowbit: {source} holds only PyTorch pickle files ({', '.join(pickles[:3])}); lowbit never "
                "unpickles weights: convert them to safetensors where you trust them "
                "(model.save_pretrained(dir, safe_serialization=True))"
            )
    model_config, reader = open_checkpoint(source)
    if getattr(model_config, "quantization_config", None) is not None:
        raise UsageError(f"lowbit: {source} is a quantized checkpoint; quantize a full-precision model")
    model = build_skeleton(model_config, dtype)
    check_saveable(model)
    check_tensors(model, reader, str(source))
    return model, reader


def write_assembled(model: nn.Module, weights: ShardedWeights, directory: Path, tokenizer,
                    max_shard_size: int | str) -> None:
    """The checkpoint's files from the tensors outside the blocks (in memory) and the staged
    blocks, in the model's state-dict order, as `save_quantized` writes them."""
    outside = unique_tensors(model, exclude=(weights.prefix + ".",))
    staged = _StagedTensors(sorted(weights.staging.glob("block_*.safetensors")))
    order = [k for k in model.state_dict() if k in outside or k in staged]
    tensors = _Chain(outside, staged)
    sizes = {k: tensors.nbytes(k) for k in order}
    write_checkpoint(model, quantization_config(model), tensors, directory, tokenizer, max_shard_size, sizes)
    shutil.rmtree(weights.staging)


class _StagedTensors(Mapping):
    """The tensors of the staged block files, read one at a time on access."""

    def __init__(self, files: list[Path]):
        self.file_of: dict[str, Path] = {}
        self.headers: dict[str, tuple[str, list[int]]] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    view = f.get_slice(key)
                    self.file_of[key] = file
                    self.headers[key] = (view.get_dtype(), view.get_shape())

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(str(self.file_of[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.file_of)

    def __len__(self) -> int:
        return len(self.file_of)

    def nbytes(self, key: str) -> int:
        dtype, shape = self.headers[key]
        return SAFETENSORS_DTYPES[dtype].itemsize * int(torch.Size(shape).numel())


class _Chain(Mapping):
    """Tensors in memory, then staged ones."""

    def __init__(self, resident: Mapping[str, torch.Tensor], staged: _StagedTensors):
        self.resident, self.staged = resident, staged

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.resident[key] if key in self.resident else self.staged[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.resident
        yield from self.staged

    def __len__(self) -> int:
        return len(self.resident) + len(self.staged)

    def nbytes(self, key: str) -> int:
        if key in self.resident:
            t = self.resident[key]
            return t.numel() * t.element_size()
        return self.staged.nbytes(key)


# --- peak memory -------------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> None:
    """Starts a new peak of resident memory (Linux; elsewhere the process's peak counts)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int | None:
    """Bytes of the peak resident memory since `reset_peak_rss` (None where unknown)."""
    with contextlib.suppress(OSError, ValueError):
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None
