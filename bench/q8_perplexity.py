"""Perplexity of a lowbit checkpoint with the CPU integer path against fp32 activations.

The integer path (x quantized to int8 per 32 inputs, `docs/KERNELS.md`) runs
when a linear layer sees at most 16 rows, as in token-by-token decoding; a
perplexity evaluation feeds whole windows, which take the exact fp32 kernels.
To measure what the integer path does to a model's predictions, this script
scores the same windows twice: once in exact mode, once with every quantized
layer fed 16 rows at a time, so that all of them go through the integer path
(x is quantized row by row, so the chunk size does not change the result).

    python bench/q8_perplexity.py ./smollm2-135m-w3g64
    python bench/q8_perplexity.py ./ckpt --data wiki --seqlen 512 --max-windows 16
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

# Measure the checkout this script belongs to, even if another lowbit is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowbit import kernels  # noqa: E402
from lowbit.calib.data import token_stream  # noqa: E402
from lowbit.cli.common import load_any, load_texts  # noqa: E402
from lowbit.eval.perplexity import token_perplexity  # noqa: E402
from lowbit.nn import QuantLinear  # noqa: E402

ROWS = 16  # the most rows the integer path takes


@contextlib.contextmanager
def rows_at_a_time(rows: int = ROWS):
    """Every QuantLinear computes its input `rows` rows at a time."""
    forward = QuantLinear.forward

    def chunked(self, x):
        flat = x.reshape(-1, x.shape[-1])
        y = torch.cat([forward(self, flat[i : i + rows]) for i in range(0, flat.shape[0], rows)])
        return y.reshape(*x.shape[:-1], y.shape[-1])

    QuantLinear.forward = chunked
    try:
        yield
    finally:
        QuantLinear.forward = forward


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", default="wiki")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_any(args.checkpoint, torch.device("cpu"), None)
    stream = token_stream(tokenizer, load_texts([args.data], "evaluation"))
    results = {}
    for name, exact, context in [("exact (fp32 x)", True, contextlib.nullcontext()),
                                 ("integer path (int8 x)", False, rows_at_a_time())]:
        start = time.perf_counter()
        with kernels.use_cpu_exact(exact), context:
            results[name] = token_perplexity(model, stream, args.seqlen, args.max_windows, progress=False)
            kernel = kernels.cpu_linear_kernel(ROWS if not exact else args.seqlen)
        print(f"{name:24s} perplexity {results[name]:.4f}  ({time.perf_counter() - start:.0f} s, kernel: {kernel})")
    exact, q8 = results.values()
    print(f"{args.checkpoint}: {args.data} evaluation split, {args.max_windows} windows x {args.seqlen} "
          f"tokens, CPU variant {kernels.cpu_isa()}: integer path changes perplexity by "
          f"{100 * (q8 / exact - 1):+.3f} %")


if __name__ == "__main__":
    main()
