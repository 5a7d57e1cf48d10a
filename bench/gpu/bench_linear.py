"""lowbit's CUDA `linear` against torch.nn.functional.linear in fp16 on one GPU.

Measures two ceilings first (device-to-device copy bandwidth, cuBLAS fp16 matmul
rate), then, per weight shape N x K (out x in features), bit width and number of
rows M of x, the time of lowbit's automatic kernel choice and of every other
kernel that can run, against F.linear on the dequantized fp16 weight.

Timing: CUDA events around each call, median over many calls. The calls are
queued behind a sleep kernel so that the GPU never waits for Python, and each
call uses the next of several copies of the weights, together over three times
the L2 cache, so that every call reads its weight from DRAM.

    python bench/gpu/bench_linear.py --out results/   # writes bench.md and bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit import ops

SHAPES = [(8192, 8192), (28672, 8192), (8192, 28672), (4096, 4096)]  # (N, K)
BITS = [2, 3, 4]
MS = [1, 4, 16, 64, 256, 4096]
GROUP = 64
KERNELS = ("gemv", "gemm", "dequant_matmul")


class Timer:
    """Median GPU time of fn(i) over calls i = 0, 1, ..., in milliseconds."""

    def __init__(self, max_calls: int = 100, min_calls: int = 10, budget_s: float = 0.2):
        self.max_calls, self.min_calls, self.budget_s = max_calls, min_calls, budget_s

    def __call__(self, fn) -> float:
        for i in range(3):  # warm-up: first-call costs stay out of the numbers
            fn(i)
        torch.cuda.synchronize()
        times: list[float] = []
        start = time.perf_counter()
        i = 0
        while len(times) < self.max_calls and (
            len(times) < self.min_calls or time.perf_counter() - start < self.budget_s
        ):
            batch = []
            torch.cuda._sleep(20_000_000)  # ~10 ms: lets Python queue the batch ahead of the GPU
            for _ in range(20):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn(i)
                end.record()
                batch.append((begin, end))
                i += 1
            torch.cuda.synchronize()
            times += [b.elapsed_time(e) for b, e in batch]
        return statistics.median(times)


def copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy, bytes read plus bytes written per second."""
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = timer(lambda i: dst.copy_(src))
    return 2 * n / (ms * 1e-3)


def matmul_rate(timer: Timer) -> float:
    """cuBLAS fp16 8192^3 matmul on random data, FLOP/s."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    ms = timer(lambda i: a @ b)
    return 2 * 8192**3 / (ms * 1e-3)


def quantized_weight(n: int, k: int, bits: int):
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device="cuda")
    packed = ops.pack(codes, bits)
    scales = (torch.rand(n, k // GROUP, device="cuda") * 0.01 + 0.001).half()
    zeros = (torch.rand(n, k // GROUP, device="cuda") * (2**bits - 1)).half()
    return packed, scales, zeros


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copies_for(one_copy_bytes: int, l2_bytes: int) -> int:
    return max(2, math.ceil(3 * l2_bytes / one_copy_bytes))


def run(args) -> dict:
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    timer = Timer()
    result = {
        "device": props.name,
        "multiprocessors": props.multi_processor_count,
        "l2_bytes": l2,
        "torch": torch.__version__,
        "copy_bytes_per_s": copy_bandwidth(timer),
        "fp16_matmul_flop_per_s": matmul_rate(timer),
        "rows": [],
        "skipped": [],
    }
    print(f"{props.name}: {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB; "
          f"copy {result['copy_bytes_per_s'] / 1e9:.0f} GB/s, "
          f"fp16 matmul {result['fp16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    deadline = time.perf_counter() + args.budget_s
    for n, k in args.shapes:
        if time.perf_counter() > deadline:
            result["skipped"].append(f"{n}x{k}: time budget spent")
            continue
        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.float16) for m in args.ms}
        dense = None
        fp16_ms = {}
        for bits in args.bits:
            base = quantized_weight(n, k, bits)
            copies = [base] + [tuple(t.clone() for t in base) for _ in range(copies_for(nbytes(*base), l2) - 1)]
            if dense is None:  # the fp16 baseline: the dequantized weight of the first bit width
                w = ops.dequantize(*base, bits, GROUP)
                dense = [w] + [w.clone() for _ in range(copies_for(nbytes(w), l2) - 1)]
            for m in args.ms:
                if time.perf_counter() > deadline:
                    result["skipped"].append(f"{n}x{k} {bits}-bit M={m}: time budget spent")
                    continue
                x = xs[m]
                if m not in fp16_ms:
                    fp16_ms[m] = timer(lambda i: F.linear(x, dense[i % len(dense)]))
                auto = ops.cuda_linear_path(m, torch.float16)
                times = {}
                for kernel in KERNELS:
                    if kernel == "gemv" and m > 16:
                        continue
                    with ops.use_cuda_linear_path(kernel):
                        times[kernel] = timer(lambda i: ops.linear(x, *copies[i % len(copies)], bits, GROUP))
                with ops.use_cuda_linear_path(auto):
                    y = ops.linear(x, *base, bits, GROUP)
                y_ref = F.linear(x.float(), ops.dequantize(*base, bits, GROUP).float())
                err = ((y.float() - y_ref).norm() / y_ref.norm()).item()
                moved = nbytes(*base, x) + m * n * 2
                row = {
                    "n": n, "k": k, "bits": bits, "m": m, "kernel": auto,
                    "ms": times[auto], "kernel_ms": times, "fp16_ms": fp16_ms[m],
                    "bytes": moved, "gb_per_s": moved / (times[auto] * 1e-3) / 1e9,
                    "speedup": fp16_ms[m] / times[auto], "rel_err": err,
                }
                result["rows"].append(row)
                print(f"{n}x{k} {bits}-bit M={m}: {auto} {times[auto] * 1e3:.1f} us, "
                      f"fp16 {fp16_ms[m] * 1e3:.1f} us, x{row['speedup']:.2f}, err {err:.1e}", flush=True)
            del copies, base
        del dense, xs
        torch.cuda.empty_cache()
    return result


def markdown(result: dict) -> str:
    copy = result["copy_bytes_per_s"]
    lines = [
        f"{result['device']} ({result['multiprocessors']} SMs, L2 {result['l2_bytes'] / 2**20:.0f} MiB), "
        f"torch {result['torch']}. Ceilings: device copy {copy / 1e9:.0f} GB/s (read + write), "
        f"cuBLAS fp16 matmul {result['fp16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s. "
        f"Weights N x K (out x in features), group size {GROUP}, fp16 scales and zeros, fp16 "
        "activations x[M, K]; times are medians of CUDA-event timings with weights rotated over 3x "
        "the L2; GB/s counts the packed weight, scales, zeros, x and y once.",
        "",
        "| N x K | M | bits | kernel | lowbit us | GB/s | % of copy | fp16 us | speedup | rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['n']}x{r['k']} | {r['m']} | {r['bits']} | {r['kernel']} | {r['ms'] * 1e3:.1f} | "
            f"{r['gb_per_s']:.0f} | {100 * r['gb_per_s'] * 1e9 / copy:.0f}% | {r['fp16_ms'] * 1e3:.1f} | "
            f"{r['speedup']:.2f}x | {r['rel_err']:.1e} |"
        )
    lines += ["", "Every kernel (us; the automatic choice in bold):", "",
              "| N x K | M | bits | " + " | ".join(KERNELS) + " |", "|---|---|---|" + "---|" * len(KERNELS)]
    for r in result["rows"]:
        cells = []
        for kernel in KERNELS:
            t = r["kernel_ms"].get(kernel)
            cell = "-" if t is None else f"{t * 1e3:.1f}"
            cells.append(f"**{cell}**" if kernel == r["kernel"] else cell)
        lines.append(f"| {r['n']}x{r['k']} | {r['m']} | {r['bits']} | " + " | ".join(cells) + " |")
    lines += ["", "Targets:", ""] + targets(result)
    if result["skipped"]:
        lines += ["", "Not measured: " + "; ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def targets(result: dict) -> list[str]:
    rows = result["rows"]
    big = [(n, k) for n, k in SHAPES if n * k >= 8192 * 8192]
    largest = max(n * k for n, k in SHAPES)

    def check(name, selected, value, goal, unit="x"):
        if not selected:
            return f"- {name}: not measured"
        worst = min(selected, key=value)
        ok = all(value(r) >= goal for r in selected)
        return (f"- {name}: {'met' if ok else 'MISSED'} (worst {value(worst):.2f}{unit} "
                f"at {worst['n']}x{worst['k']}, goal {goal}{unit})")

    def pick(bits=None, m=None, shapes=None):
        return [r for r in rows if (bits is None or r["bits"] == bits) and (m is None or r["m"] == m)
                and (shapes is None or (r["n"], r["k"]) in shapes)]

    copy = result["copy_bytes_per_s"]
    return [
        check("2-bit M=1 >= 5x fp16 on 8192x8192 and larger", pick(2, 1, big), lambda r: r["speedup"], 5),
        check("3-bit M=1 >= 4x", pick(3, 1, big), lambda r: r["speedup"], 4),
        check("2-bit M=16 >= 4x", pick(2, 16, big), lambda r: r["speedup"], 4),
        check("M=4096 >= 0.85x", pick(m=4096), lambda r: r["speedup"], 0.85),
        check("2-bit M=1 >= 70% of copy bandwidth on the largest shape",
              [r for r in pick(2, 1) if r["n"] * r["k"] == largest],
              lambda r: 100 * r["gb_per_s"] * 1e9 / copy, 70, unit="% of copy"),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for bench.md and bench.json")
    parser.add_argument("--budget-s", type=float, default=120.0, help="stop starting new cases after this")
    parser.add_argument("--shapes", type=lambda s: [tuple(map(int, p.split("x"))) for p in s.split(",")],
                        default=SHAPES, help="N x K list, e.g. 8192x8192,4096x4096")
    parser.add_argument("--bits", type=lambda s: [int(b) for b in s.split(",")], default=BITS)
    parser.add_argument("--ms", type=lambda s: [int(m) for m in s.split(",")], default=MS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_linear: needs a CUDA GPU", file=sys.stderr)
        return 2
    result = run(args)
    table = markdown(result)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.md").write_text(table)
        (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
