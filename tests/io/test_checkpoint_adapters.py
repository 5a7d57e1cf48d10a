"""Low-rank adapters (as apiq writes them) in lowbit checkpoints: exact round trips through
both loaders, refusals of missing, malformed or contradicting adapter entries, and GPTQ
export after merging."""

import json
import re

import pytest
import torch
import transformers
from checkpoint_tools import assert_same_quant_layers, quantized, rewrite_quant_config, rewrite_tensors
from tiny import logits, tiny_llama, token_batch

import lowbit
from lowbit.errors import CheckpointError
from lowbit.io.checkpoint import FORMAT_VERSION, load_quantized, quant_modules, save_quantized

QP = "model.layers.0.self_attn.q_proj"  # adapter rank 4, float32


def with_adapters(model, dtypes=(torch.float32, torch.float16, torch.bfloat16), rank=4):
    """Random adapters with non-zero B on every other quantized layer, cycling through `dtypes`
    and ranks rank, rank + 1, ...; the other layers stay plain."""
    gen = torch.Generator().manual_seed(0)
    for i, (name, layer) in enumerate(quant_modules(model).items()):
        if i % 2:
            continue
        r, dtype = rank + i % 3, dtypes[(i // 2) % len(dtypes)]
        A = torch.randn(r, layer.in_features, generator=gen) / layer.in_features**0.5
        B = torch.randn(layer.out_features, r, generator=gen) * 0.1
        layer.attach_adapter(r, 2.0 * r + i, A=A, B=B, dtype=dtype)
    return model


def adapter_specs(model):
    return {name: {"rank": m.adapter.rank, "dtype": str(m.adapter.A.dtype).removeprefix("torch.")}
            for name, m in quant_modules(model).items() if m.adapter is not None}


@pytest.fixture
def adapted(tmp_path):
    """(model with adapters on every other layer, its checkpoint directory)."""
    model = with_adapters(quantized(tiny_llama(), 3, 32))
    save_quantized(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_adapters_round_trip_exactly(adapted):
    model, path = adapted
    tokens = token_batch(model)
    expected = logits(model, tokens)
    plain = logits(quantized(tiny_llama(), 3, 32), tokens)
    assert not torch.allclose(expected, plain)  # the adapters change the output
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == FORMAT_VERSION == 2
    stored = {name: spec["adapter"] for name, spec in qc["modules"].items() if "adapter" in spec}
    assert stored == adapter_specs(model) and len(stored) == 7
    assert {s["dtype"] for s in stored.values()} == {"float32", "float16", "bfloat16"}
    for loaded in (load_quantized(path), transformers.AutoModelForCausalLM.from_pretrained(path)):
        assert_same_quant_layers(model, loaded)  # includes adapter.A, adapter.B, adapter.scale
        assert adapter_specs(loaded) == adapter_specs(model)
        assert torch.equal(logits(loaded, tokens), expected)
    info = lowbit.checkpoint_info(path)
    assert info["format"] == "lowbit v2" and sum(info["adapters"].values()) == 7
    assert info["adapters"]["rank 4 float32"] == 3  # layers 0, 6 and 12


def test_apiq_model_round_trips_through_a_checkpoint(tmp_path):
    """The real path: lowbit.quantize with method="apiq" keeps adapters, and save -> load
    (both loaders) rebuilds them exactly."""
    model = tiny_llama(layers=1)
    tokens = token_batch(model, 2, 16)
    config = lowbit.QuantConfig(method="apiq", bits=2, group_size=32, epochs=1, lora_rank=4, progress=False)
    lowbit.quantize(model, config, tokens)
    assert all(m.adapter is not None and m.adapter.B.abs().sum() > 0
               for m in quant_modules(model).values())
    expected = logits(model, tokens)
    save_quantized(model, tmp_path / "ckpt")
    for loaded in (load_quantized(tmp_path / "ckpt"),
                   transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")):
        assert_same_quant_layers(model, loaded)
        assert torch.equal(logits(loaded, tokens), expected)
        assert loaded.lowbit_config.method == "apiq" and loaded.lowbit_config.settings["lora_rank"] == 4


@pytest.mark.parametrize("tensor", ["adapter.A", "adapter.B", "adapter.scale"])
def test_missing_adapter_tensor(adapted, tensor):
    _, path = adapted
    rewrite_tensors(path, lambda t: t.pop(f"{QP}.{tensor}"))
    message = rf"lacks tensor {re.escape(QP)}\.{re.escape(tensor)}"
    with pytest.raises(CheckpointError, match=message + r" for the quantized module .*adapter rank 4"):
        load_quantized(path)
    with pytest.raises(CheckpointError, match=message):
        transformers.AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("tensor, shape", [("adapter.A", [5, 64]), ("adapter.B", [64, 3]),
                                           ("adapter.scale", [1])])
def test_adapter_tensor_of_the_wrong_shape(adapted, tensor, shape):
    _, path = adapted
    key = f"{QP}.{tensor}"
    rewrite_tensors(path, lambda t: t.update({key: torch.ones(shape, dtype=t[key].dtype)}))
    for load in (load_quantized, transformers.AutoModelForCausalLM.from_pretrained):
        with pytest.raises(CheckpointError, match=rf"{re.escape(key)} has shape {re.escape(str(shape))}"):
            load(path)


def test_adapter_tensor_of_the_wrong_dtype_or_not_finite(adapted):
    _, path = adapted
    key = f"{QP}.adapter.B"
    rewrite_tensors(path, lambda t: t.update({key: t[key].half()}))
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)} has dtype torch.float16, expected torch.float32"):
        load_quantized(path)
    rewrite_tensors(path, lambda t: t.update({key: t[key].float().index_fill(0, torch.tensor([2]), float("inf"))}))
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)} contains NaN"):
        load_quantized(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda a: a.update(rank=5), r"adapter\.A has shape \[4, 64\], expected \[5, 64\]"),
        (lambda a: a.update(rank=0), "rank must be a positive integer"),
        (lambda a: a.update(dtype="int8"), r"adapter\.dtype must be one of"),
        (lambda a: a.update(alpha=8), "exactly the keys 'rank' and 'dtype'"),
    ],
)
def test_adapter_entry_contradicting_or_malformed(adapted, edit, message):
    _, path = adapted
    rewrite_quant_config(path, lambda qc: edit(qc["modules"][QP]["adapter"]))
    with pytest.raises(CheckpointError, match=message):
        load_quantized(path)


def test_format_version_1_is_still_read_but_cannot_hold_adapters(adapted, tmp_path):
    model = quantized(tiny_llama())
    save_quantized(model, tmp_path / "v1")
    rewrite_quant_config(tmp_path / "v1", lambda qc: qc.update(format_version=1))
    tokens = token_batch(model)
    assert torch.equal(logits(load_quantized(tmp_path / "v1"), tokens), logits(model, tokens))
    assert lowbit.checkpoint_info(tmp_path / "v1")["format"] == "lowbit v1"
    _, path = adapted
    rewrite_quant_config(path, lambda qc: qc.update(format_version=1))
    with pytest.raises(CheckpointError, match="unknown field 'adapter' .it needs format_version 2"):
        load_quantized(path)


def test_gptq_export_refuses_adapters_until_they_are_merged(adapted, tmp_path):
    model, _ = adapted
    with pytest.raises(ValueError, match=r"7 layers .* carry low-rank adapters.*lowbit\.merge_adapters"):
        lowbit.export_gptq(model, tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()
    expected = {name: m.merge_and_requantize().dequantize() for name, m in quant_modules(model).items()
                if m.adapter is not None}
    merged = lowbit.merge_adapters(model)
    assert sorted(merged) == sorted(expected)
    assert all(m.adapter is None for m in quant_modules(model).values())
    lowbit.export_gptq(model, tmp_path / "gptq")
    imported = lowbit.load_gptq(tmp_path / "gptq")
    for name, weight in expected.items():
        assert torch.equal(imported.get_submodule(name).dequantize(), weight), name
