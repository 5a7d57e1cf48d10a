"""Per-block checkpoints of a calibration run, so that an interrupted run can resume.

A checkpoint directory holds:

  manifest.json           what the checkpoints belong to: digests of the model
                          weights, the calibration tokens and the settings
  block_NNNN.safetensors  what the method learned for block NNNN, with its log
  streams.safetensors     both activation streams after the last finished block

Every file is written to a temporary name and renamed, so a crash leaves either
the old or the new file, never half of one. The streams file is written last:
the number of finished blocks is the one it records.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.errors import CheckpointMismatchError, CorruptCheckpointError
from lowbit.io.files import write_atomic

FORMAT = 1


def _update_with_tensor(digest, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_digest(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]] | None = None) -> str:
    """sha256 of the model's configuration and of every parameter and buffer (`tensors`:
    the state dict's (name, tensor) pairs in its order, when they are not in memory)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    digest.update(type(model).__name__.encode())
    for name, t in model.state_dict().items() if tensors is None else tensors:
        _update_with_tensor(digest, name, t)
    return digest.hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    digest = hashlib.sha256()
    _update_with_tensor(digest, "tokens", t)
    return digest.hexdigest()


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class BlockStore:
    """A directory of per-block safetensors files and the manifest that says what they
    belong to. A directory whose manifest differs from `manifest` is refused by
    `check_manifest`; every file is written atomically (`lowbit.io.files.write_atomic`)."""

    def __init__(self, directory: str | os.PathLike, manifest: dict[str, Any]):
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "manifest.json"
        if path.exists():
            try:
                found = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise self.corrupt(path, exc) from exc
            if not isinstance(found, dict):
                raise self.corrupt(path, "not a JSON object")
            self.check_manifest(found, manifest)
        else:
            write_atomic(path, lambda p: p.write_text(json.dumps(manifest, indent=2)))

    def check_manifest(self, found: dict[str, Any], expected: dict[str, Any]) -> None:
        raise NotImplementedError

    def corrupt(self, path: Path, why: BaseException | str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"lowbit: cannot read {path}: {why}; delete the directory")

    def block_path(self, index: int) -> Path:
        return self.directory / f"block_{index:04d}.safetensors"

    def has_block(self, index: int) -> bool:
        return self.block_path(index).exists()

    def write_tensors(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        write_atomic(path, lambda p: save_file(tensors, str(p), metadata=metadata))

    def read_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise self.corrupt(path, exc) from exc

    def read_metadata(self, path: Path) -> dict[str, str]:
        try:
            with safe_open(path, framework="pt") as f:
                return f.metadata() or {}
        except (OSError, SafetensorError) as exc:
            raise self.corrupt(path, exc) from exc


class CheckpointStore(BlockStore):
    """The checkpoints of one calibration run in `directory`, checked against `fingerprint`
    ({"model": ..., "data": ..., "config": ...} digests)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, str], num_blocks: int):
        self.num_blocks = num_blocks
        super().__init__(directory, {"format": FORMAT, "num_blocks": num_blocks, "fingerprint": fingerprint})

    def check_manifest(self, found: dict[str, Any], expected: dict[str, Any]) -> None:
        if found.get("format") != FORMAT or found.get("num_blocks") != expected["num_blocks"]:
            raise CheckpointMismatchError(
                f"lowbit: the checkpoints in {self.directory} were written by another lowbit "
                "version or for a model with another number of blocks; use another cache_dir "
                "or delete this one"
            )
        what = {"model": "model weights", "data": "calibration data", "config": "quantization settings"}
        for key, label in what.items():
            if found.get("fingerprint", {}).get(key) != expected["fingerprint"][key]:
                raise CheckpointMismatchError(
                    f"lowbit: the checkpoints in {self.directory} belong to other {label} than "
                    "this run's; use another cache_dir, or delete this one to start afresh"
                )

    @property
    def streams_path(self) -> Path:
        return self.directory / "streams.safetensors"

    def finished_blocks(self) -> int:
        """How many blocks are done (0 without a streams file)."""
        if not self.streams_path.exists():
            return 0
        value = self.read_metadata(self.streams_path).get("finished_blocks")
        if not (isinstance(value, str) and value.isdigit() and 0 < int(value) <= self.num_blocks):
            raise self.corrupt(
                self.streams_path, f"finished_blocks is {value!r}, not a count of blocks in 1..{self.num_blocks}"
            )
        return int(value)

    def save_block(self, index: int, learned: dict[str, torch.Tensor], log: dict[str, Any],
                   streams: dict[str, torch.Tensor]) -> None:
        self.write_tensors(self.block_path(index), learned, {"log": json.dumps(log)})
        self.write_tensors(self.streams_path, streams, {"finished_blocks": str(index + 1)})

    def load_block(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        path = self.block_path(index)
        return self.read_tensors(path), self._read_log(path, dict)

    def _read_log(self, path: Path, kind: type) -> Any:
        text = self.read_metadata(path).get("log")
        try:
            log = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise self.corrupt(path, f"its log is not JSON ({exc})") from exc
        if not isinstance(log, kind) or (kind is list and not all(isinstance(e, dict) for e in log)):
            raise self.corrupt(path, f"its log is not a JSON {'object' if kind is dict else 'list of objects'}: "
                                     f"{text[:40]!r}")
        return log

    def load_streams(self, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
        """Both streams, or their `rows` (the windows of one process), read from the file alone."""
        try:
            with safe_open(self.streams_path, framework="pt") as f:
                return {key: f.get_slice(key)[rows] for key in f.keys()}
        except (OSError, SafetensorError) as exc:
            raise self.corrupt(self.streams_path, exc) from exc

    # --- the end-to-end stage ---

    @property
    def e2e_path(self) -> Path:
        return self.directory / "end_to_end.safetensors"

    def has_e2e(self) -> bool:
        return self.e2e_path.exists()

    def save_e2e(self, state: dict[str, torch.Tensor], log: list[dict[str, Any]]) -> None:
        self.write_tensors(self.e2e_path, state, {"log": json.dumps(log)})

    def load_e2e(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        return self.read_tensors(self.e2e_path), self._read_log(self.e2e_path, list)
