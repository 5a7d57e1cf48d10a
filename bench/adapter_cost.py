"""What a low-rank adapter beside the packed weight costs a QuantLinear: bytes per
weight and CPU decode time (M = 1), against the same layers without the adapter and
a dense fp32 nn.Linear, measured in the same run.

The layers are those of one SmolLM2-135M decoder block (q, k, v, o, gate, up, down:
3.54 M weights) with random codes; the adapter is apiq's default (rank 64, stored in
fp16 as apiq exports it, or fp32). Timing is cold: each measured pass walks over
enough copies of the block (> 128 MB) that no copy is in the last-level cache when
it is used again; the time is per block (7 layer calls), median of the passes.

    flock /tmp/lowbit-cpu.lock python bench/adapter_cost.py

The packed-kernel speed depends on the CPU kernel variant in this build (printed);
re-measure after kernel changes.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lowbit  # noqa: E402
from lowbit.nn import QuantLinear  # noqa: E402

# (in_features, out_features) of SmolLM2-135M's block linears
SHAPES = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576),
          "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}
CACHE_BYTES = 128 * 2**20


def quant_block(bits: int, group_size: int, adapter: torch.dtype | None, rank: int) -> list[nn.Module]:
    layers = []
    for k, n in SHAPES.values():
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
        scales = (torch.rand(n, k // group_size) * 0.01 + 0.001).half()
        zeros = torch.randint(0, 2**bits, (n, k // group_size)).half()
        layer = QuantLinear.from_quantized(codes, scales, zeros, None, bits=bits, group_size=group_size)
        if adapter is not None:
            layer.attach_adapter(rank, 16.0, B=torch.randn(n, rank) * 0.01, dtype=adapter)
        layers.append(layer.requires_grad_(False))
    return layers


def dense_block() -> list[nn.Module]:
    return [nn.Linear(k, n, bias=False).requires_grad_(False) for k, n in SHAPES.values()]


def block_bytes(layers: list[nn.Module]) -> int:
    return sum(t.numel() * t.element_size() for layer in layers for t in layer.state_dict().values())


def weights_per_block() -> int:
    return sum(k * n for k, n in SHAPES.values())


@torch.inference_mode()
def time_block(make, passes: int) -> tuple[float, int]:
    """Median seconds per block over `passes` cold passes, and the bytes of one block."""
    first = make()
    size = block_bytes(first)
    copies = [first] + [make() for _ in range(max(1, CACHE_BYTES // size + 1) - 1)]
    x = {k: torch.randn(1, k) for k, _ in SHAPES.values()}
    for block in copies[:2]:  # warm up the code paths
        for layer, (k, _) in zip(block, SHAPES.values()):
            layer(x[k])
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        for block in copies:
            for layer, (k, _) in zip(block, SHAPES.values()):
                layer(x[k])
        times.append((time.perf_counter() - started) / len(copies))
    return statistics.median(times), size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="2,3")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "adapter_cost.md"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    n_weights = weights_per_block()
    dense_s, dense_bytes = time_block(dense_block, args.passes)
    lines = [
        f"CPU kernel variant `{lowbit.ops.cpu_isa()}`, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"one SmolLM2-135M block ({n_weights / 1e6:.2f} M weights, 7 layers), M = 1, fp32 activations, "
        f"cold (> {CACHE_BYTES >> 20} MB of copies), median of {args.passes} passes.",
        "",
        "| layer | bits/weight | bytes/block | µs/block | time vs no adapter | time vs dense fp32 |",
        "|---|---|---|---|---|---|",
        f"| dense fp32 nn.Linear | 32.00 | {dense_bytes:,} | {dense_s * 1e6:.0f} | - | 1.00 |",
    ]
    for bits in (int(b) for b in args.bits.split(",")):
        base_s = None
        for label, adapter in (("none", None), ("fp16", torch.float16), ("fp32", torch.float32)):
            seconds, size = time_block(functools.partial(quant_block, bits, args.group_size, adapter, args.rank),
                                       args.passes)
            base_s = base_s or seconds
            name = f"W{bits} g{args.group_size}" + ("" if adapter is None else f" + rank-{args.rank} {label} adapter")
            lines.append(f"| {name} | {8 * size / n_weights:.2f} | {size:,} | {seconds * 1e6:.0f} | "
                         f"{seconds / base_s:.2f} | {seconds / dense_s:.2f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
