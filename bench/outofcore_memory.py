"""Peak memory of out-of-core calibration against the depth of the model.

Writes Llama-shaped checkpoints with random bf16 weights (hidden 4096, MLP 14336, 32
heads, 8 key-value heads: the blocks of an 8B Llama; vocabulary 4096) of each depth
under DIR, then quantizes each in a fresh process (omniquant, 3-bit g128, a small
budget) and prints the peak resident memory of the calibration and the seconds per
block. The peak should not grow with the depth.

    python bench/outofcore_memory.py DIR --blocks 3 6     # ~1.3 and 2.6 GB of weights

The checkpoints are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=4096, max_position_embeddings=4096, tie_word_embeddings=False)
SHARD_BYTES = 1 << 30


def write_random_checkpoint(directory: Path, blocks: int) -> None:
    """A Llama directory of random bf16 weights, written shard by shard (never all in memory)."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(num_hidden_layers=blocks, dtype="bfloat16", **SHAPE)
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(blocks)
    shard, size, weight_map, files = {}, 0, {}, []

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        files.append(name)
        shard, size = {}, 0

    for name, shape in shapes.items():
        ones = name.endswith("norm.weight")
        t = torch.ones(shape) if ones else torch.randn(shape, generator=generator) * 0.02
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def calibrate(source: str, output: str) -> None:
    """In the child process: quantizes `source` out of core, prints a JSON line."""
    import lowbit
    from lowbit.calib.outofcore import quantize_directory

    torch.manual_seed(0)
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 128))
    config = lowbit.QuantConfig(bits=3, group_size=128, nsamples=2, seqlen=128, epochs=1,
                                lr={"clip": 0.1}, progress=False, device="cpu")
    report = quantize_directory(source, output, config, tokens)
    print(json.dumps({"blocks": len(report.blocks), "peak_rss": report.peak_rss,
                      "block_seconds": [round(b.seconds, 1) for b in report.blocks],
                      "seconds": round(report.seconds, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--blocks", type=int, nargs="+", default=[3, 6])
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return calibrate(*args.child)
    for blocks in args.blocks:
        source, output = args.dir / f"llama-{blocks}-blocks", args.dir / f"llama-{blocks}-blocks-w3g128"
        write_random_checkpoint(source, blocks)
        weights = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        line = subprocess.run([sys.executable, __file__, str(args.dir), "--child", str(source), str(output)],
                              check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        result = json.loads(line)
        print(f"{blocks} blocks, {weights / 2**30:.2f} GiB of bf16 weights: peak RSS "
              f"{result['peak_rss'] / 2**30:.2f} GiB; seconds per block {result['block_seconds']} "
              f"({result['seconds']} s in all)", flush=True)
        if not args.keep:
            shutil.rmtree(source)
            shutil.rmtree(output, ignore_errors=True)


if __name__ == "__main__":
    main()
