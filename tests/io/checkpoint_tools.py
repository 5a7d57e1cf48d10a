"""Helpers of the checkpoint tests: quantize a tiny model, compare quantized layers, and
edit a saved checkpoint's tensors or quantization_config in place."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.io.checkpoint import quant_modules


def quantized(model, bits=3, group_size=32, **kwargs):
    lowbit.quantize_rtn(model, bits, group_size, **kwargs)
    return model


def assert_same_quant_layers(a, b):
    layers_a, layers_b = quant_modules(a), quant_modules(b)
    assert layers_a.keys() == layers_b.keys()
    for name, la in layers_a.items():
        lb = layers_b[name]
        assert type(la) is type(lb), name
        sa, sb = la.state_dict(), lb.state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{name}.{key}"


def rewrite_tensors(path, edit):
    """Applies `edit(dict)` to the tensors of a single-file checkpoint."""
    file = Path(path) / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def rewrite_quant_config(path, edit):
    file = Path(path) / "config.json"
    config = json.loads(file.read_text())
    edit(config["quantization_config"])
    file.write_text(json.dumps(config))
