"""Speed of lowbit's kernels and quantized models against full precision, measured in one run.

Two kinds of measurement, both reported as ratios against a baseline timed in
the same process:

- `linear_table`: `lowbit.ops.linear` against `torch.nn.functional.linear` with
  fp32 and bf16 weights, on random weights of given shapes. Timings are cold:
  each implementation cycles through enough copies of its weights to exceed the
  last-level cache (`rotate_mb`), so every call reads its weights from memory,
  as in token-by-token generation. (`bench/cpu_linear.py`, `lowbit bench`: lowbit.cli.bench.)
- `model_speed`: a whole causal LM, e.g. the full-precision model before and the
  QuantLinear model after quantization: greedy decoding rate (batch 1, KV cache,
  decoded as `lowbit generate` decodes: `lowbit.nn.decoding`) and the time of one
  pass through its linear layers at one row. (The summary of `lowbit quantize`.)

Everything runs under `torch.inference_mode()`, as generation does (it also skips
the autograd wrapper of the custom op, tens of microseconds per call).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import format
from lowbit.errors import UsageError
from lowbit.kernels import backends, ops, reference
from lowbit.nn.decoding import DEFAULT_LM_HEAD, Decoding

# --- timing ------------------------------------------------------------------------------


def median_seconds(fn: Callable, argsets: Sequence[tuple], seconds: float, min_runs: int = 7,
                   max_runs: int = 400) -> float:
    """Median wall time of fn(*args), cycling through argsets, after one warm-up pass over
    the first two; as many runs as fit in `seconds` within [min_runs, max_runs]."""
    for args in argsets[:2]:
        fn(*args)
    start = time.perf_counter()
    fn(*argsets[0])
    estimate = max(time.perf_counter() - start, 1e-6)
    runs = int(min(max_runs, max(min_runs, seconds / estimate)))
    times = []
    for i in range(runs):
        args = argsets[i % len(argsets)]
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- one linear layer, random weights ----------------------------------------------------


def parse_shape(text: str) -> tuple[int, int]:
    """"NxK" (out_features x in_features, the orientation of nn.Linear.weight) -> (N, K)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"lowbit: a shape is out_features x in_features like 4096x4096, got {text!r}")
    return int(parts[0]), int(parts[1])


def copies_for(nbytes: int, rotate_mb: float) -> int:
    """How many copies of an `nbytes` weight add up to more than `rotate_mb` megabytes."""
    return max(2, int(rotate_mb * 1e6 // nbytes) + 1)


def dense_copies(n: int, k: int, dtype: torch.dtype, rotate_mb: float) -> list[torch.Tensor]:
    count = copies_for(n * k * torch.finfo(dtype).bits // 8, rotate_mb)
    return [torch.randn(n, k).to(dtype) for _ in range(count)]


def quant_copies(n: int, k: int, bits: int, group_size: int, scale_dtype: torch.dtype,
                 rotate_mb: float) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    """Copies of one random quantized weight (packed, scales, zeros), and its bytes."""
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    packed = reference.pack(codes, bits)
    scales = (torch.rand(n, k // group_size) * 0.02 + 0.001).to(scale_dtype)
    zeros = (torch.rand(n, k // group_size) * (2**bits - 1)).to(scale_dtype)
    nbytes = packed.numel() * 4 + 2 * scales.numel() * scales.element_size()
    count = copies_for(nbytes, rotate_mb)
    return [(packed.clone(), scales.clone(), zeros.clone()) for _ in range(count)], nbytes


@dataclass
class LinearRow:
    """One (shape, M, bits) measurement; times in seconds."""

    shape: str
    m: int
    bits: int
    lowbit: float
    fp32: float
    bf16: float
    gbps: float  # weight bytes lowbit reads (codes, scales, zeros) per second, in GB/s
    kernel: str = ""  # the CPU kernel that ran (lowbit.ops.cpu_linear_kernel)


def linear_table(
    shapes: Iterable[str],
    ms: Iterable[int],
    bits: Iterable[int],
    group_size: int = 64,
    scale_dtype: torch.dtype = torch.float16,
    rotate_mb: float = 160.0,
    seconds: float = 0.6,
    min_runs: int = 7,
    max_runs: int = 400,
    on_row: Callable[[LinearRow], None] | None = None,
) -> list[LinearRow]:
    """Times lowbit.ops.linear and F.linear (fp32 and bf16 weights) with fp32 activations
    [M, K] on every shape, M and bit width; `on_row` sees each row as it is measured."""
    shapes, ms, bits = list(shapes), list(ms), list(bits)
    for b in bits:
        format.check_bits(b)
    parsed = [parse_shape(s) for s in shapes]
    for n, k in parsed:
        format.check_in_features(k)
        format.check_group_size(group_size, k)
    timing = dict(seconds=seconds, min_runs=min_runs, max_runs=max_runs)
    rows = []
    with torch.inference_mode():
        for n, k in parsed:
            # One set of weight copies at a time, each timed at every M.
            x = {m: torch.randn(m, k) for m in ms}
            dense = {}
            for dtype in (torch.float32, torch.bfloat16):
                ws = dense_copies(n, k, dtype, rotate_mb)
                dense[dtype] = {m: median_seconds(F.linear, [(x[m].to(dtype), w) for w in ws], **timing)
                                for m in ms}
                del ws
            quant = {}
            for b in bits:
                qs, nbytes = quant_copies(n, k, b, group_size, scale_dtype, rotate_mb)
                for m in ms:
                    t = median_seconds(ops.linear, [(x[m], p, s, z, b, group_size) for p, s, z in qs], **timing)
                    quant[m, b] = t, nbytes / t / 1e9
                del qs
            for m in ms:
                for b in bits:
                    t, gbps = quant[m, b]
                    rows.append(LinearRow(f"{n}x{k}", m, b, t, dense[torch.float32][m],
                                          dense[torch.bfloat16][m], gbps, backends.cpu_linear_kernel(m)))
                    if on_row is not None:
                        on_row(rows[-1])
    return rows


LINEAR_HEADER = ("shape", "M", "bits", "kernel", "lowbit ms", "fp32 ms", "bf16 ms", "vs fp32", "vs bf16", "GB/s")
_WIDTHS = (11, 4, 4, 11, 10, 10, 10, 8, 8, 6)
EXTRA_WIDTH = 11  # the text width of each extra column (see format_linear_header)


def _format_cells(cells: Sequence, markdown: bool) -> str:
    if markdown:
        return "| " + " | ".join(str(c) for c in cells) + " |"
    widths = _WIDTHS + (EXTRA_WIDTH,) * (len(cells) - len(_WIDTHS))
    return " ".join(f"{c!s:>{w}}" for c, w in zip(cells, widths))


def format_linear_header(markdown: bool = False, extra: Sequence[str] = ()) -> str:
    """The table's header; `extra` names columns appended to every row (the `extra` cells
    of format_linear_row), each at most EXTRA_WIDTH characters in text form."""
    header = (*LINEAR_HEADER, *extra)
    if markdown:
        return _format_cells(header, True) + "\n|" + "---|" * len(header)
    return _format_cells(header, False)


def format_linear_row(r: LinearRow, markdown: bool = False, extra: Sequence[str] = ()) -> str:
    cells = (r.shape, r.m, r.bits, r.kernel, f"{r.lowbit * 1e3:.3f}", f"{r.fp32 * 1e3:.3f}", f"{r.bf16 * 1e3:.3f}",
             f"{r.fp32 / r.lowbit:.2f}x", f"{r.bf16 / r.lowbit:.2f}x", f"{r.gbps:.1f}", *extra)
    return _format_cells(cells, markdown)


# --- a whole model -----------------------------------------------------------------------


@dataclass
class ModelSpeed:
    """decode_tokens_per_s: greedy decoding, batch 1, KV cache, prefill excluded, by the
    path `decoding` describes. linear_seconds: one pass through the measured linear
    layers, one row each (median)."""

    decode_tokens_per_s: float
    linear_seconds: float
    linear_layers: int
    decoding: str


def _device_of(module: nn.Module) -> torch.device:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


@torch.inference_mode()
def linear_pass_seconds(layers: Sequence[nn.Module], seconds: float = 1.0) -> float:
    """Median time of calling every layer once on a random fp32 row [1, in_features]: the
    linear work of one decoded token. Each layer's weights are read once per pass, so
    weights larger than the cache in total are timed cold, as in decoding."""
    if not layers:
        raise UsageError("lowbit: no linear layers to time")

    def in_features(layer):
        return layer.in_features if hasattr(layer, "in_features") else layer.weight.shape[0]  # Conv1D

    device = _device_of(layers[0])
    inputs = {k: torch.randn(1, k, device=device) for k in {in_features(layer) for layer in layers}}
    calls = [(layer, inputs[in_features(layer)]) for layer in layers]

    def one_pass():
        for layer, x in calls:
            layer(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return median_seconds(one_pass, [()], seconds, min_runs=5, max_runs=200)


class _TokenClock:
    """A `generate` streamer that notes when each new token arrives (the first `put` is
    the prompt)."""

    def __init__(self):
        self.arrivals: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.arrivals.append(time.perf_counter())
        self._prompt_seen = True

    def end(self):
        pass


@torch.inference_mode()
def decode_tokens_per_second(decoding: Decoding, input_ids: torch.Tensor, new_tokens: int = 32,
                             repeats: int = 3) -> float:
    """Greedy decoding rate of a causal LM, batch 1, with the KV cache: (n - 1) new tokens
    over the time from the first new token to the last (so the prompt's prefill is
    excluded), for n = `new_tokens` tokens (no EOS stop); median of `repeats` runs
    after a warm-up."""
    from transformers import GenerationConfig

    if new_tokens < 2:
        raise UsageError("lowbit: decoding speed needs at least 2 new tokens")
    ids = input_ids.reshape(1, -1).to(_device_of(decoding.model))

    def rate(n: int) -> float:
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
        clock = _TokenClock()
        decoding.generate(ids, config, clock)
        return (len(clock.arrivals) - 1) / (clock.arrivals[-1] - clock.arrivals[0])

    rate(2)  # warm-up
    return statistics.median(rate(new_tokens) for _ in range(repeats))


def model_speed(model: nn.Module, layers: Sequence[nn.Module], input_ids: torch.Tensor,
                new_tokens: int = 32, seconds: float = 1.0, path: str = "lean",
                lm_head: str = DEFAULT_LM_HEAD) -> ModelSpeed:
    """Decoding rate of `model` (on `path` with `lm_head`, as `lowbit generate` decodes) and
    the time of one pass through `layers` (its linear layers to compare, e.g. the ones
    quantization replaces)."""
    decoding = Decoding(model, path, lm_head)
    return ModelSpeed(decode_tokens_per_second(decoding, input_ids, new_tokens),
                      linear_pass_seconds(layers, seconds), len(layers), decoding.describe())
