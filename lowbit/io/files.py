"""Model directories on disk: atomic writes, safetensors shards and their index.

Generic plumbing, below any checkpoint schema: a directory (or file) is written
under a temporary name and swapped into place, so a reader never sees half of
one; a model directory's files are read only when they lie inside it
(`contained_file`); and safetensors weights are read through one
`SafetensorsCheckpoint` whether they are one file or indexed shards.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import re
import secrets
import shutil
import stat
import sys
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


# --- atomic replacement of a directory ----------------------------------------------------

_PARTIAL, _OLD = "partial", "old"
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one step (Linux `renameat2(RENAME_EXCHANGE)`), so that
    neither name is ever missing; False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _sibling_name(path: Path, kind: str) -> str:
    """The hidden name of a temporary sibling of `path`; the pid tells whether its writer is alive."""
    return f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _make_sibling_dir(path: Path, kind: str) -> Path:
    """A new empty directory beside `path`, with the permissions the umask gives (not 0700)."""
    while True:
        candidate = path.with_name(_sibling_name(path, kind))
        try:
            candidate.mkdir(0o777)
            return candidate
        except FileExistsError:
            continue


def _writer_is_gone(name: str) -> bool:
    """Whether the process that made a temporary sibling no longer runs (names of older
    versions carry no pid and count as gone)."""
    match = re.search(r"\.(?:partial|old)-(\d+)-[0-9a-f]+$", name)
    if match is None:
        return True
    pid = int(match.group(1))
    if pid == os.getpid():
        return False  # this process's own save may still be running (another thread)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. another user's process
        return False
    return False


def clean_leftovers(path: Path) -> None:
    """Removes the temporary siblings of `path` that killed saves left behind; if a save was
    killed between the two renames of the fallback swap, its old checkpoint is put back first."""
    for kind in (_OLD, _PARTIAL):  # an old copy is restored before partial ones are deleted
        for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}.{kind}-*")):
            if not leftover.is_dir() or leftover.is_symlink() or not _writer_is_gone(leftover.name):
                continue
            kept = leftover / path.name
            if kind == _OLD and kept.is_dir() and not os.path.lexists(path):
                os.rename(kept, path)
            shutil.rmtree(leftover, ignore_errors=True)


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Makes the complete directory `tmp` the directory `path`; the old one is deleted."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp)  # now the old checkpoint; a kill here leaves a leftover, cleaned later
    else:  # two renames: a kill between them leaves the old checkpoint in .NAME.old-*, restored later
        old = _make_sibling_dir(path, _OLD)
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `path` that becomes `path` on success.

    On any error the temporary directory is removed and an existing `path` is left
    untouched; an existing checkpoint is only replaced once the new one is complete,
    in one step where the system can (Linux), so a kill at any point leaves the old
    checkpoint or the new one at `path`. Leftovers of killed saves are cleaned first.
    """
    path = Path(path).absolute()
    if path.exists() and not _is_checkpoint_dir(path):
        raise FileExistsError(
            f"lowbit: {path} exists and is not a model directory (no config.json); not replacing it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = _make_sibling_dir(path, _PARTIAL)
    try:
        yield tmp
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unique_tensors(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The state dict without aliases (tied weights), keeping a tie's source name; `exclude`:
    prefixes of names left out (tensors held elsewhere)."""
    state = {k: t for k, t in model.state_dict().items() if not k.startswith(exclude)}
    tied_targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    for name, t in state.items():
        if t.is_meta:
            raise UsageError(f"lowbit: {name} is on the meta device (not loaded); cannot save it")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UsageError(f"lowbit: {name} contains NaN or Inf values; not writing a checkpoint of it")
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


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """One safetensors file; a failure to write (a full disk) is an OSError."""
    try:
        save_file(dict(tensors), path, metadata={"format": "pt"})
    except SafetensorError as exc:  # safetensors reports I/O errors (a full disk) as its own
        raise _as_os_error(exc, path) from exc


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], directory: Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    sizes: Mapping[str, int] | None = None,
) -> list[str]:
    """Writes tensors into `directory` as one file, or as shards of at most `max_shard_size`
    bytes each (a larger tensor gets a shard of its own) plus the standard index. `sizes`:
    the bytes of each tensor, in order, when `tensors` reads them only on access (one shard
    at a time is then in memory)."""
    limit = convert_file_size_to_int(max_shard_size)
    if sizes is None:
        sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
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
        save_tensors(shard, directory / file)
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {name: file for file, names in zip(files, shards, strict=True) for name in names},
        }
        (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return files


# --- reading files of a model directory, inside it ----------------------------------------

MAX_JSON_BYTES = 64 << 20  # config and index files are small; a larger one is not a checkpoint's


def containment_root(directory: Path) -> Path:
    """The directory whose files a model directory may use: itself, or for a snapshot in the
    Hugging Face cache (`models--org--name/snapshots/REV`, whose files link into `../../blobs`)
    the repository's cache folder."""
    real = Path(os.path.realpath(directory))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def contained_file(directory: Path, name: Any, what: str = "file") -> Path:
    """The regular file `name` of a model directory, refused unless it lies inside it: no
    absolute path, no `..`, no symbolic link leading out, no FIFO or device (which would block
    or never end)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"lowbit: {directory}: {what} name {name!r} is not a file name")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(f"lowbit: {directory}: {what} {name!r} lies outside the checkpoint directory")
    full = directory / relative
    real = Path(os.path.realpath(full))
    if not real.is_relative_to(containment_root(directory)):
        raise CheckpointError(
            f"lowbit: {full} leads outside the checkpoint directory (to {real}); not reading it"
        )
    try:
        mode = os.stat(full).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"lowbit: checkpoint file {full} is missing") from None
    except OSError as exc:  # a symbolic link loop, a permission problem
        raise CheckpointError(f"lowbit: cannot read {full}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"lowbit: {full} is not a regular file")
    return full


def read_json_file(directory: Path, name: str) -> Any:
    """A JSON file of a model directory (contained, UTF-8, bounded in size), parsed."""
    path = contained_file(directory, name)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"lowbit: {path} is larger than {MAX_JSON_BYTES >> 20} MiB; not a {name}")
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"lowbit: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except ValueError as exc:  # json.JSONDecodeError, RecursionError is not one: see below
        raise CheckpointError(f"lowbit: {path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise CheckpointError(f"lowbit: {path} nests too deeply to be a {name}") from exc
    except OSError as exc:
        raise CheckpointError(f"lowbit: cannot read {path}: {exc.strerror or exc}") from exc


# safetensors header dtype names -> torch dtypes
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _as_os_error(exc: SafetensorError, path: Path) -> OSError:
    found = re.search(r"os error (\d+)", str(exc))
    if found is None:
        return OSError(f"cannot write {path}: {exc}")
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


class SafetensorsCheckpoint:
    """The tensors of a model directory (one safetensors file or an indexed set of shards).

    Every file is opened through `contained_file` (inside the directory), and every tensor
    of a shard must be one the index assigns to it. `header(key)` gives a tensor's dtype
    and shape without reading its data."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handles: dict[str, Any] = {}
        if os.path.lexists(self.path / WEIGHTS_INDEX_NAME):
            self.file_of = self._read_index()
        elif os.path.lexists(self.path / WEIGHTS_NAME):
            self.file_of = {key: WEIGHTS_NAME for key in self._open(WEIGHTS_NAME).keys()}
        else:
            raise CheckpointError(f"lowbit: {self.path} has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")
        for file in sorted(set(self.file_of.values())):
            present = set(self._open(file).keys())
            for key in (k for k, f in self.file_of.items() if f == file and k not in present):
                raise CheckpointError(f"lowbit: tensor {key} is listed in the index but missing from {file}")
            for key in sorted(present):
                if self.file_of.get(key) != file:
                    raise CheckpointError(
                        f"lowbit: {file} holds tensor {key}, which the index does not assign to it"
                    )

    def _read_index(self) -> dict[str, str]:
        index = read_json_file(self.path, WEIGHTS_INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(
                f"lowbit: {self.path / WEIGHTS_INDEX_NAME} is not a safetensors index (no weight_map object)"
            )
        for key, file in weight_map.items():
            contained_file(self.path, file, f"the shard of {key}")
        return dict(weight_map)

    def _open(self, file: str):
        if file not in self._handles:
            full = contained_file(self.path, file, "weights file")
            try:
                self._handles[file] = safe_open(str(full), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"lowbit: {full} is corrupt or truncated ({exc})") from exc
        return self._handles[file]

    def close(self) -> None:
        """Closes the open files: their mapped pages stop counting as this process's memory
        (a reader that loads part by part calls it after each part)."""
        self._handles.clear()

    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def header(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """A tensor's dtype and shape, from its file's header (no data read)."""
        file = self.file_of[key]
        try:
            view = self._open(file).get_slice(key)
            dtype_name, shape = view.get_dtype(), tuple(view.get_shape())
        except SafetensorError as exc:
            raise CheckpointError(f"lowbit: cannot read tensor {key} from {self.path / file} ({exc})") from exc
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"lowbit: {self.path / file}: tensor {key} has an unknown dtype {dtype_name}")
        return SAFETENSORS_DTYPES[dtype_name], shape

    def __getitem__(self, key: str) -> torch.Tensor:
        file = self.file_of[key]
        try:
            return self._open(file).get_tensor(key)
        except (SafetensorError, RuntimeError, TypeError) as exc:  # torch refuses some views of bad data
            raise CheckpointError(
                f"lowbit: cannot read tensor {key} from {self.path / file} ({exc})"
            ) from exc
