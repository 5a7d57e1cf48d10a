"""`lowbit bench`: the kernels' speed against `torch.nn.functional.linear` on this machine.

`add_linear_arguments` and `run_linear_table` are shared with bench/cpu_linear.py.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
from collections.abc import Sequence

import torch

from lowbit.cli.common import FORMATTER, int_at_least
from lowbit.eval import llamacpp
from lowbit.eval.speed import LinearRow, format_linear_header, format_linear_row, linear_table
from lowbit.format import SUPPORTED_BITS
from lowbit.kernels import backends

BENCH_SHAPES = ("4096x4096", "1536x576", "576x1536")


def run(args: argparse.Namespace) -> int:
    rows = run_linear_table(args, out=lambda line: print(line, flush=True))
    print("\ngeometric mean speedup over fp32 F.linear:")
    for m in dict.fromkeys(r.m for r in rows):
        cells = []
        for bits in dict.fromkeys(r.bits for r in rows):
            ratios = [r.fp32 / r.lowbit for r in rows if r.m == m and r.bits == bits]
            cells.append(f"{bits}-bit {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}x")
        print(f"  M = {m}: " + ", ".join(cells))
    return 0


def add_linear_arguments(parser: argparse.ArgumentParser, shapes: Sequence[str], ms: Sequence[int],
                         seconds: float, threads: int | None = None) -> None:
    """The flags of a linear-table run, with the given defaults (shared by `lowbit bench`
    and bench/cpu_linear.py)."""
    parser.add_argument("--shapes", nargs="+", default=list(shapes), metavar="NxK",
                        help="weight shapes, out_features x in_features (default: %(default)s)")
    parser.add_argument("--m", nargs="+", type=int_at_least(1), default=list(ms), metavar="M",
                        help="activation rows: 1 is token-by-token decoding (default: %(default)s)")
    parser.add_argument("--bits", nargs="+", type=int, default=list(SUPPORTED_BITS),
                        choices=SUPPORTED_BITS, help="bit widths (default: %(default)s)")
    parser.add_argument("--group-size", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--scale-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="dtype of scales and zeros (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=threads,
                        help="torch threads (default: %s)" % (threads or f"torch's, {torch.get_num_threads()} here"))
    parser.add_argument("--isa", default=None, choices=backends.supported_cpu_isas(),
                        help="force a CPU kernel variant (default: the best this CPU runs)")
    parser.add_argument("--rotate-mb", type=float, default=160.0,
                        help="each implementation cycles through weight copies adding up to at "
                             "least this many MB, to defeat the cache (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=seconds,
                        help="time budget per measurement (default: %(default)s)")
    parser.add_argument("--min-runs", type=int, default=7, help=argparse.SUPPRESS)
    parser.add_argument("--max-runs", type=int, default=400, help=argparse.SUPPRESS)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--llamacpp", metavar="PATH", default=os.environ.get(llamacpp.ENV_VAR),
                        help="llama.cpp's coldbench binary (ggml-coldbench anchor): adds llama.cpp's k-quants "
                             "at matched bits, timed in the same run with the same threads (default: "
                             f"${llamacpp.ENV_VAR} if set)")


def run_linear_table(args: argparse.Namespace, out=print) -> list[LinearRow]:
    """Runs and prints the table described by `add_linear_arguments`' flags."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa:
        backends.set_cpu_isa(args.isa)
    ggml = None
    if args.llamacpp:
        coldbench = llamacpp.Coldbench(args.llamacpp, torch.get_num_threads(), args.seconds, args.rotate_mb)
        coldbench.check()
        ggml = llamacpp.Columns(coldbench, args.m, args.bits)
    out(f"# lowbit CPU linear: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, kernels: {backends.cpu_isa()}, torch {torch.__version__}, "
        f"g{args.group_size} {args.scale_dtype} scales and zeros, fp32 activations, "
        f"weights rotated over >= {args.rotate_mb:.0f} MB, inference mode, medians")
    if ggml is not None:
        out(ggml.describe())
    out(format_linear_header(args.markdown, ggml.names if ggml is not None else ()))
    rows = linear_table(
        args.shapes, args.m, args.bits, args.group_size, getattr(torch, args.scale_dtype), args.rotate_mb,
        args.seconds, args.min_runs, args.max_runs,
        on_row=lambda r: out(format_linear_row(r, args.markdown, ggml(r) if ggml is not None else ())),
    )
    for line in ggml.failures() if ggml is not None else ():
        out(line)
    return rows


def add_parser(sub, common) -> None:
    p = sub.add_parser("bench", parents=[common], formatter_class=FORMATTER,
                       help="kernel speedup table on this machine",
                       description="lowbit's fused dequantize-and-multiply kernel against "
                                   "torch.nn.functional.linear with fp32 and bf16 weights, measured in the "
                                   "same run, cold (weights rotated through more memory than the cache). "
                                   "M = 1 is token-by-token decoding. The defaults take under a minute; "
                                   "bench/cpu_linear.py runs the full table.",
                       epilog="examples:\n  lowbit bench\n  lowbit bench --shapes 4096x4096 11008x4096 "
                              "--m 1 16 128 --markdown")
    add_linear_arguments(p, shapes=BENCH_SHAPES, ms=[1, 16], seconds=0.3)
    p.set_defaults(run=run)
