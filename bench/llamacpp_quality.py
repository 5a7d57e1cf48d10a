"""llama.cpp's quantization of the default model, scored with lowbit's perplexity.

Each GGUF file (made by `llama-quantize`, with or without an importance matrix) is
read with the `gguf` package (`pip install gguf`, or llama.cpp's own gguf-py); the
weights of every linear layer in the decoder blocks are dequantized and put into the
full-precision SmolLM2 model (embeddings and the tied head stay in full precision, as
in lowbit's checkpoints), which is then scored on the same windows as lowbit's
models. The bits per weight are those the file really spends on these layers
(bytes x 8 / weights), next to the ggml types it used: on this model, whose rows are
576 and 1536 wide, the 256-wide k-quant super-blocks do not fit many layers and
llama.cpp falls back to other types.

    python bench/llamacpp_quality.py F16.gguf Q3_K_S.gguf ... [--windows 16] [--seqlen 512]

The f16 file is a check: its layers must give the full-precision perplexity.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowbit.calib.data import token_stream  # noqa: E402
from lowbit.eval.perplexity import token_perplexity  # noqa: E402
from lowbit.io import assets  # noqa: E402

# GGUF tensor names of a Llama block's linear layers -> the transformers names.
LAYERS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes the row order llama.cpp's converter gives q and k (rotary halves interleaved)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def linear_weights(path: Path, config) -> tuple[dict[str, torch.Tensor], float, dict[str, int]]:
    """transformers name -> float32 weight; bits per weight; weights per ggml type."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    weights, bits, count, types = {}, 0, 0, collections.Counter()
    for t in reader.tensors:
        block, _, rest = t.name.removeprefix("blk.").partition(".")
        kind = rest.removesuffix(".weight")
        if not t.name.startswith("blk.") or kind not in LAYERS:
            continue
        w = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        if kind == "attn_q":
            w = unpermute(w, config.num_attention_heads)
        elif kind == "attn_k":
            w = unpermute(w, config.num_key_value_heads)
        weights[f"model.layers.{block}.{LAYERS[kind]}.weight"] = torch.from_numpy(np.ascontiguousarray(w)).float()
        bits += int(t.n_bytes) * 8
        count += int(t.n_elements)
        types[t.tensor_type.name] += int(t.n_elements)
    return weights, bits / count, dict(types)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", nargs="+", type=Path)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args(argv)
    model, tokenizer = assets.load_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    streams = {split: token_stream(tokenizer, assets.load_texts(split, "evaluation")) for split in ("wiki", "sotu")}

    def score():
        return {split: token_perplexity(model, s, args.seqlen, args.windows, progress=False)
                for split, s in streams.items()}

    print(f"full precision: {score()}", flush=True)
    print("| file | bits per weight (linear layers) | ggml types (share of weights) | wiki PPL | sotu PPL |")
    print("|---|---|---|---|---|")
    for path in args.gguf:
        weights, bpw, types = linear_weights(path, model.config)
        missing = sorted(k for k in original if k.endswith("proj.weight") and k not in weights)
        if missing:
            raise SystemExit(f"{path}: no tensor for {missing[0]}")
        model.load_state_dict({**original, **weights})
        total = sum(types.values())
        mix = ", ".join(f"{name} {n / total:.0%}" for name, n in sorted(types.items(), key=lambda kv: -kv[1]))
        ppl = score()
        print(f"| {path.name} | {bpw:.2f} | {mix} | {ppl['wiki']:.2f} | {ppl['sotu']:.2f} |", flush=True)
    model.load_state_dict(original)


if __name__ == "__main__":
    main()
