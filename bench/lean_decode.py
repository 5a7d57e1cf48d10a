"""Decoding speed of `lowbit generate`'s paths, measured in one process, runs interleaved.

Loads a lowbit checkpoint and the full-precision model once, then times greedy decoding
(batch 1, the prompt of `lowbit generate`, prefill excluded) for each configuration in
turn, `--runs` rounds, so that a noisy machine spreads its noise over all of them. Prints
the median and range of tokens/s per configuration (markdown).

    python bench/lean_decode.py ./smollm2-135m-w3g64 --threads 2 --runs 5 --tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

# Measure the checkout this script belongs to, even if another lowbit is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowbit.cli.common import load_any  # noqa: E402
from lowbit.cli.generate import SPEED_PROMPT  # noqa: E402
from lowbit.eval.speed import decode_tokens_per_second  # noqa: E402
from lowbit.kernels import backends  # noqa: E402
from lowbit.nn.decoding import Decoding  # noqa: E402

# (label, model: "lowbit" or "fp", path, lm_head)
CONFIGURATIONS = [
    ("lowbit, lean path, q4t lm_head (the default)", "lowbit", "lean", "q4t"),
    ("lowbit, lean path, q4r lm_head", "lowbit", "lean", "q4r"),
    ("lowbit, lean path, q4 lm_head", "lowbit", "lean", "q4"),
    ("lowbit, lean path, fp32 lm_head", "lowbit", "lean", "model"),
    ("lowbit, transformers' generate, fp32 lm_head (before)", "lowbit", "transformers", "model"),
    ("full precision, lean path, fp32 lm_head", "fp", "lean", "model"),
    ("full precision, transformers' generate (before)", "fp", "transformers", "model"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--full-precision", default="smollm2", help="the model before quantization (default: smollm2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {"lowbit": load_any(args.checkpoint, "cpu")[:2], "fp": load_any(args.full_precision, "cpu")[:2]}
    decodings = [Decoding(models[m][0], path, head) for _, m, path, head in CONFIGURATIONS]
    ids = models["lowbit"][1](SPEED_PROMPT, return_tensors="pt").input_ids
    rates: list[list[float]] = [[] for _ in CONFIGURATIONS]
    for _ in range(args.runs):
        for decoding, found in zip(decodings, rates):
            found.append(decode_tokens_per_second(decoding, ids, args.tokens, repeats=1))
            print(f"  {decoding.describe()}: {found[-1]:.1f} tokens/s", file=sys.stderr, flush=True)
    print(f"{backends.describe_cpu_kernels()}; {args.tokens} new tokens, {args.runs} runs each\n")
    print("| configuration | tokens/s, median | range |\n|---|---|---|")
    for (label, *_), found in zip(CONFIGURATIONS, rates):
        print(f"| {label} | {statistics.median(found):.1f} | {min(found):.1f}-{max(found):.1f} |")


if __name__ == "__main__":
    main()
