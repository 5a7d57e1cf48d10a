"""Model directories on disk: atomic writes, safetensors shards and their index.

Generic plumbing, below any checkpoint schema: a directory (or file) is written
under a temporary name and renamed into place, so a reader never sees half of
one, and safetensors weights are read through one `SafetensorsCheckpoint`
whether they are one file or indexed shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.utils.hub import convert_file_size_to_int

from lowbit.errors import CheckpointError, UsageError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Calls `write(tmp)` on a temporary name beside `path`, then renames it to `path`:
    a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _is_checkpoint_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return not names or "config.json" in names


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `path` that becomes `path` on success.

    On any error the temporary directory is removed and an existing `path` is left
    untouched; an existing checkpoint is only replaced once the new one is complete.
    """
    path = Path(path).absolute()
    if path.exists() and not _is_checkpoint_dir(path):
        raise FileExistsError(
            f"lowbit: {path} exists and is not a model directory (no config.json); not replacing it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases (tied weights), keeping a tie's source name."""
    state = model.state_dict()
    tied_targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    for name, t in state.items():
        if t.is_meta:
            raise UsageError(f"lowbit: {name} is on the meta device (not loaded); cannot save it")
    seen: set[tuple] = set()
    keep = set()
    for name in sorted(state, key=lambda n: n in tied_targets):  # sources first (stable sort)
        t = state[name]
        key = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if key not in seen:
            seen.add(key)
            keep.add(name)
    return {name: t for name, t in state.items() if name in keep}


def shard_names(n_shards: int) -> list[str]:
    if n_shards == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], directory: Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> list[str]:
    """Writes tensors into `directory` as one file, or as shards of at most `max_shard_size`
    bytes each (a larger tensor gets a shard of its own) plus the standard index."""
    limit = convert_file_size_to_int(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = shard_names(len(shards))
    progress = tqdm(list(zip(files, shards, strict=True)), desc="lowbit: writing", disable=len(files) == 1)
    for file, names in progress:
        shard, storages = {}, set()
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            shard[name] = t.clone() if ptr in storages else t  # safetensors refuses shared storage
            storages.add(ptr)
        save_file(shard, directory / file, metadata={"format": "pt"})
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {name: file for file, names in zip(files, shards, strict=True) for name in names},
        }
        (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return files


class SafetensorsCheckpoint:
    """The tensors of a model directory (one safetensors file or an indexed set of shards)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handles: dict[str, Any] = {}
        index_file = self.path / WEIGHTS_INDEX_NAME
        if index_file.exists():
            try:
                self.file_of = dict(json.loads(index_file.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"lowbit: {index_file} is not a valid safetensors index: {exc}"
                ) from exc
        elif (self.path / WEIGHTS_NAME).exists():
            self.file_of = {key: WEIGHTS_NAME for key in self._open(WEIGHTS_NAME).keys()}
        else:
            raise CheckpointError(f"lowbit: {self.path} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")
        for file in sorted(set(self.file_of.values())):
            present = set(self._open(file).keys())
            for key in (k for k, f in self.file_of.items() if f == file and k not in present):
                raise CheckpointError(f"lowbit: tensor {key} is listed in the index but missing from {file}")

    def _open(self, file: str):
        if file not in self._handles:
            full = self.path / file
            if not full.is_file():
                raise CheckpointError(f"lowbit: checkpoint file {full} is missing")
            try:
                self._handles[file] = safe_open(str(full), framework="pt")
            except SafetensorError as exc:
                raise CheckpointError(f"lowbit: {full} is corrupt or truncated ({exc})") from exc
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def __getitem__(self, key: str) -> torch.Tensor:
        file = self.file_of[key]
        try:
            return self._open(file).get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(
                f"lowbit: cannot read tensor {key} from {self.path / file} ({exc})"
            ) from exc
