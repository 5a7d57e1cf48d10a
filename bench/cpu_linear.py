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

The measurement lives in lowbit.eval.speed (also behind `lowbit bench`, whose
defaults are a smaller table). Shapes are out_features x in_features (the
orientation of nn.Linear.weight). Share the machine? Run it under
`flock /tmp/lowbit-cpu.lock`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Benchmark the checkout this script belongs to, even if another lowbit is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowbit.cli import bench  # noqa: E402

DEFAULT_SHAPES = ["4096x4096", "11008x4096", "4096x11008", "576x576", "1536x576", "576x1536"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_linear_arguments(p, shapes=DEFAULT_SHAPES, ms=[1, 16, 128], seconds=0.6, threads=2)
    return p.parse_args(argv)


def main(argv=None):
    bench.run_linear_table(parse_args(argv), out=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
