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
    python bench/cpu_linear.py --llamacpp /path/to/coldbench   # with llama.cpp's k-quants

The measurement lives in lowbit.eval.speed (also behind `lowbit bench`, whose
defaults are a smaller table). Shapes are out_features x in_features (the
orientation of nn.Linear.weight). Share the machine? Run it under
`flock /tmp/lowbit-cpu.lock`.

With --llamacpp (or $LOWBIT_COLDBENCH), each shape is also timed by llama.cpp's
coldbench (shared/anchors/ggml-coldbench beside the checkout) with
the same threads, time budget and rotation: ggml's f32 matmul and the k-quant of
each bit width (2-bit Q2_K, 3-bit Q3_K, 4-bit Q4_K), plain and, at M > 1,
repacked (Q2_K, Q4_K). The extra columns give llama.cpp's speedups over its own
f32 next to lowbit's over fp32 F.linear, and lowbit's time over llama.cpp's.
`make bench LLAMACPP=/path/to/coldbench` runs the full table with them;
`COLDBENCH_SRC=/path/to/coldbench.cpp bench/llamacpp_decode.sh MODEL_DIR WORK_DIR`
builds the binary (WORK_DIR/coldbench) with llama.cpp.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Benchmark the checkout this script belongs to, even if another lowbit is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowbit.cli import bench  # noqa: E402
from lowbit.cli.common import is_user_error, one_line  # noqa: E402

DEFAULT_SHAPES = ["4096x4096", "11008x4096", "4096x11008", "576x576", "1536x576", "576x1536"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_linear_arguments(p, shapes=DEFAULT_SHAPES, ms=[1, 16, 128], seconds=0.6, threads=2)
    return p.parse_args(argv)


def main(argv=None):
    try:
        bench.run_linear_table(parse_args(argv), out=lambda line: print(line, flush=True))
    except Exception as exc:
        if not is_user_error(exc):
            raise
        sys.exit(f"cpu_linear.py: error: {one_line(exc)}")


if __name__ == "__main__":
    main()
