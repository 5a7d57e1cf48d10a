"""CPU speed of lowbit.ops.linear against torch.nn.functional.linear.

Prints one row per (shape, M, bits): the median time of lowbit's fused kernel
and of F.linear with an fp32 and a bf16 weight, all measured in this run, the
speedups, and the weight bytes lowbit streams per second (packed codes, scales
and zeros). Timings are cold: each implementation cycles through enough
copies of its weights to exceed the last-level cache (--rotate-mb), so every
call reads its weights from memory, as in token-by-token generation. All
calls run under torch.inference_mode(), as generation does (it also skips the
autograd wrapper of the custom op, tens of microseconds per call).

    python bench/cpu_linear.py                       # the full table, 2 threads
    python bench/cpu_linear.py --shapes 4096x4096 --m 1 --bits 2
    python bench/cpu_linear.py --markdown             # rows for BENCHMARKS.md

Shapes are out_features x in_features (the orientation of nn.Linear.weight).
Share the machine? Run it under `flock /tmp/lowbit-cpu.lock`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Benchmark the checkout this script belongs to, even if another lowbit is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowbit import ops, reference  # noqa: E402

DEFAULT_SHAPES = ["4096x4096", "11008x4096", "4096x11008", "576x576", "1536x576", "576x1536"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxK shapes")
    p.add_argument("--m", nargs="+", type=int, default=[1, 16, 128], help="activation rows")
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--scale-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", default=None, help="force a CPU kernel variant (default: the best)")
    p.add_argument("--rotate-mb", type=float, default=160.0,
                   help="weight copies per implementation add up to at least this many MB")
    p.add_argument("--seconds", type=float, default=0.6,
                   help="time budget per measurement (at least --min-runs runs)")
    p.add_argument("--min-runs", type=int, default=7)
    p.add_argument("--max-runs", type=int, default=400)
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return p.parse_args(argv)


def median_seconds(fn, argsets, seconds, min_runs, max_runs):
    """Median wall time of fn(*args), cycling through argsets (one warm-up pass)."""
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


def copies_for(nbytes, rotate_mb):
    return max(2, int(rotate_mb * 1e6 // nbytes) + 1)


def dense_weights(n, k, dtype, rotate_mb):
    count = copies_for(n * k * torch.finfo(dtype).bits // 8, rotate_mb)
    return [torch.randn(n, k).to(dtype) for _ in range(count)]


def quant_weights(n, k, bits, group_size, scale_dtype, rotate_mb):
    """Copies of one random quantized weight, and its bytes."""
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    packed = reference.pack(codes, bits)
    scales = (torch.rand(n, k // group_size) * 0.02 + 0.001).to(scale_dtype)
    zeros = (torch.rand(n, k // group_size) * (2**bits - 1)).to(scale_dtype)
    nbytes = packed.numel() * 4 + 2 * scales.numel() * scales.element_size()
    count = copies_for(nbytes, rotate_mb)
    return [(packed.clone(), scales.clone(), zeros.clone()) for _ in range(count)], nbytes


def measure(args):
    scale_dtype = getattr(torch, args.scale_dtype)
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        for m in args.m:
            x32 = torch.randn(m, k)
            x16 = x32.to(torch.bfloat16)
            timing = dict(seconds=args.seconds, min_runs=args.min_runs, max_runs=args.max_runs)
            ws = dense_weights(n, k, torch.float32, args.rotate_mb)
            t_fp32 = median_seconds(F.linear, [(x32, w) for w in ws], **timing)
            ws = dense_weights(n, k, torch.bfloat16, args.rotate_mb)
            t_bf16 = median_seconds(F.linear, [(x16, w) for w in ws], **timing)
            del ws
            for bits in args.bits:
                qs, nbytes = quant_weights(n, k, bits, args.group_size, scale_dtype, args.rotate_mb)
                argsets = [(x32, p, s, z, bits, args.group_size) for p, s, z in qs]
                t = median_seconds(ops.linear, argsets, **timing)
                rows.append(dict(shape=f"{n}x{k}", m=m, bits=bits, t=t, t_fp32=t_fp32, t_bf16=t_bf16,
                                 gbps=nbytes / t / 1e9))
                print_row(rows[-1], args.markdown, flush=True)
                del qs
    return rows


HEADER = ("shape", "M", "bits", "lowbit ms", "fp32 ms", "bf16 ms", "vs fp32", "vs bf16", "GB/s")


def print_header(markdown):
    if markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
    else:
        print("{:>11} {:>4} {:>4} {:>10} {:>10} {:>10} {:>8} {:>8} {:>6}".format(*HEADER))


def print_row(r, markdown, flush=False):
    cells = (r["shape"], r["m"], r["bits"], f"{r['t'] * 1e3:.3f}", f"{r['t_fp32'] * 1e3:.3f}",
             f"{r['t_bf16'] * 1e3:.3f}", f"{r['t_fp32'] / r['t']:.2f}x", f"{r['t_bf16'] / r['t']:.2f}x",
             f"{r['gbps']:.1f}")
    if markdown:
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=flush)
    else:
        print("{:>11} {:>4} {:>4} {:>10} {:>10} {:>10} {:>8} {:>8} {:>6}".format(*cells), flush=flush)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.isa:
        ops.set_cpu_isa(args.isa)
    print(f"# lowbit CPU linear: {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, kernels: {ops.cpu_isa()}, torch {torch.__version__}, "
          f"g{args.group_size} {args.scale_dtype} scales and zeros, fp32 activations, "
          f"weights rotated over >= {args.rotate_mb:.0f} MB, inference mode, medians")
    print_header(args.markdown)
    with torch.inference_mode():
        measure(args)


if __name__ == "__main__":
    main()
