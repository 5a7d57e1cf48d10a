"""GPTQ interoperability: the layout against an independent reader/writer (gptq_reference.py),
export/import round trips, v1 zero points, act-order g_idx, and refusals. When GPTQModel's
pure-torch layer can be imported, its packer and dequantizer are checked against lowbit too."""

import importlib
import json
import os
import sys
import types
from pathlib import Path

import gptq_reference as ref
import pytest
import torch
import transformers
from helpers import random_quant_weight
from safetensors.torch import load_file, save_file
from tiny import logits, tiny_llama, tiny_opt, token_batch

import lowbit
from lowbit.errors import CheckpointError
from lowbit.io import gptq
from lowbit.io.checkpoint import quant_modules
from lowbit.kernels import reference
from lowbit.nn.modules import linear_layers

BITS = [2, 3, 4]


def float_weight(layer):
    """A QuantLinear's weight [N, K] in float32, (codes - zeros) * scales, in input order."""
    w = reference.dequantize(
        layer.packed, layer.scales.float(), layer.zeros.float(), layer.bits, layer.group_size
    )
    if isinstance(layer, lowbit.PermutedQuantLinear):
        w = w[:, torch.argsort(layer.input_perm)]
    return w


def read_checkpoint(path):
    tensors = {}
    for f in Path(path).glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


# --- packing ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k, n", [(32, 1), (64, 37), (256, 96), (96, 33)])
def test_packing_matches_the_independent_layout(bits, k, n):
    codes = torch.randint(0, 2**bits, (k, n))
    qweight = gptq.pack_rows(codes, bits)
    assert qweight.dtype == torch.int32 and list(qweight.shape) == [k * bits // 32, n]
    assert torch.equal(qweight, ref.write_qweight(codes, bits))
    assert torch.equal(gptq.unpack_rows(ref.write_qweight(codes, bits), bits, k), codes)
    zeros = torch.randint(0, 2**bits, (k // 32, n))
    qzeros = gptq.pack_columns(zeros, bits)
    assert list(qzeros.shape) == [k // 32, -(-n * bits // 32)]
    assert torch.equal(qzeros, ref.write_qzeros(zeros, bits))
    assert torch.equal(gptq.unpack_columns(ref.write_qzeros(zeros, bits), bits, n), zeros)


def test_three_bit_values_straddle_words_as_documented():
    """Value 10 of a 3-bit stream sits in bits 30-31 of word 0 and bit 0 of word 1."""
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10, 0] = 0b101
    codes[21, 0] = 0b110  # bits 63..65: bit 31 of word 1, bits 0-1 of word 2
    words = gptq.pack_rows(codes, 3)[:, 0].tolist()
    # word 0: low bits 01 of value 10 at bits 30-31; word 1: its high bit at bit 0, and the
    # low bit (0) of value 21 at bit 31; word 2: the high bits 11 of value 21 at bits 0-1
    assert [w & 0xFFFFFFFF for w in words] == [0b01 << 30, 0b1, 0b11]


# --- export ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt-bias"])
@pytest.mark.parametrize("bits", BITS)
def test_export_then_import_gives_identical_weights(tmp_path, make, bits):
    model = make()
    lowbit.quantize_rtn(model, bits, 32)
    tokens = token_batch(model)
    lowbit.export_gptq(model, tmp_path / "gptq")
    loaded = lowbit.load_gptq(tmp_path / "gptq")
    for name, layer in quant_modules(model).items():
        imported = loaded.get_submodule(name)
        assert type(imported) is lowbit.QuantLinear
        assert torch.equal(imported.dequantize(), layer.dequantize()), name
        assert torch.equal(imported.packed, layer.packed) and torch.equal(imported.zeros, layer.zeros), name
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


@pytest.mark.parametrize("bits", BITS)
def test_exported_tensors_follow_the_published_layout(tmp_path, bits):
    model = tiny_opt()
    lowbit.quantize_rtn(model, bits, 32)
    lowbit.export_gptq(model, tmp_path / "gptq")
    tensors = read_checkpoint(tmp_path / "gptq")
    for name, layer in quant_modules(model).items():
        assert {k for k in tensors if k.startswith(name + ".")} == {
            f"{name}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx", "bias")
        }
        assert (
            tensors[f"{name}.scales"].dtype == torch.float16 and tensors[f"{name}.g_idx"].dtype == torch.int32
        )
        assert torch.equal(tensors[f"{name}.g_idx"].long(), torch.arange(layer.in_features) // 32)
        w = ref.dequantize(*(tensors[f"{name}.{t}"] for t in ("qweight", "qzeros", "scales", "g_idx")), bits)
        assert torch.equal(w.T, float_weight(layer)), name
        assert torch.equal(tensors[f"{name}.bias"], layer.bias.half())
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config == json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert {
        k: config[k] for k in ("quant_method", "checkpoint_format", "bits", "group_size", "desc_act", "sym")
    } == {
        "quant_method": "gptq",
        "checkpoint_format": "gptq_v2",
        "bits": bits,
        "group_size": 32,
        "desc_act": False,
        "sym": False,
    }
    assert "model.decoder.embed_tokens.weight" in tensors and "dynamic" not in config


def test_float32_scales_are_rounded_with_a_warning(tmp_path):
    model = tiny_llama()
    lowbit.quantize_rtn(model, 4, 32, scale_dtype=torch.float32)
    with pytest.warns(UserWarning, match="rounded to float16"):
        lowbit.export_gptq(model, tmp_path / "gptq")
    loaded = lowbit.load_gptq(tmp_path / "gptq")
    layer = model.model.layers[0].mlp.up_proj
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.scales, layer.scales.half())


def test_per_channel_groups_are_written_as_minus_one(tmp_path):
    model = tiny_llama()
    lowbit.quantize_rtn(model, 4, None)
    lowbit.export_gptq(model, tmp_path / "gptq")
    assert json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())["group_size"] == -1
    loaded = lowbit.load_gptq(tmp_path / "gptq")
    for name, layer in quant_modules(model).items():
        assert loaded.get_submodule(name).group_size == layer.in_features
        assert torch.equal(loaded.get_submodule(name).dequantize(), layer.dequantize())


def test_fractional_zeros_are_refused(tmp_path):
    model = tiny_llama()
    lowbit.quantize_rtn(model, 3, 32)
    _, packed, scales, zeros = random_quant_weight(64, 64, 3, 32)  # fractional zeros
    model.model.layers[1].self_attn.q_proj.load_state_dict(
        {"packed": packed, "scales": scales, "zeros": zeros}
    )
    with pytest.raises(
        ValueError,
        match=r"export model\.layers\.1\.self_attn\.q_proj to GPTQ: .* zeros are not integers in \[0, 7\]",
    ):
        lowbit.export_gptq(model, tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()


def test_mixed_bit_widths_need_dynamic(tmp_path):
    model = tiny_llama()
    lowbit.quantize_rtn(
        model, 4, 32, overrides={r"model\.layers\.1\.mlp\..*": {"bits": 2, "group_size": 64}, "v_proj": None}
    )
    tokens = token_batch(model)
    with pytest.raises(ValueError, match="differ from 4-bit group size 32.*dynamic=True"):
        lowbit.export_gptq(model, tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()
    lowbit.export_gptq(model, tmp_path / "gptq", dynamic=True)
    dynamic = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())["dynamic"]
    assert dynamic[r"+:^model\.layers\.1\.mlp\.down_proj$"] == {"bits": 2, "group_size": 64}
    assert dynamic[r"+:^model\.layers\.1\.mlp\.up_proj$"] == {"bits": 2, "group_size": -1}  # 64 = in_features
    assert dynamic[r"-:^model\.layers\.0\.self_attn\.v_proj$"] == {}
    loaded = lowbit.load_gptq(tmp_path / "gptq")
    assert loaded.model.layers[1].mlp.up_proj.bits == 2 and loaded.model.layers[0].mlp.up_proj.bits == 4
    assert isinstance(loaded.model.layers[0].self_attn.v_proj, torch.nn.Linear)
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_full_precision_layers_need_dynamic(tmp_path):
    model = tiny_llama()
    lowbit.quantize_rtn(model, 4, 32, overrides={"o_proj": None})
    with pytest.raises(ValueError, match=r"left in full precision.*dynamic=True"):
        lowbit.export_gptq(model, tmp_path / "gptq")


def test_quantized_lm_head_is_declared(tmp_path):
    model = tiny_llama(tie_word_embeddings=False)
    lowbit.quantize_rtn(model, 4, 32, overrides={"lm_head": {}})
    lowbit.export_gptq(model, tmp_path / "gptq")
    assert json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())["lm_head"] is True
    assert isinstance(lowbit.load_gptq(tmp_path / "gptq").lm_head, lowbit.QuantLinear)


# --- import of hand-written GPTQ checkpoints --------------------------------------------


def write_gptq_checkpoint(path, bits, group_size=32, version=2, act_order=False, in_config=True):
    """Quantizes every decoder linear of a tiny Llama with random codes, zeros, scales (and
    g_idx permutation), sets its weight to the exact result, and writes GPTQ tensors with
    the independent writer. Returns the full-precision model and the float32 weights."""
    model = tiny_llama(tie_word_embeddings=False)
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {}
    for name, linear in linear_layers(model).items():
        if name == "lm_head":
            continue
        n, k = linear.weight.shape
        groups = k // group_size
        q = torch.randint(0, 2**bits, (k, n))
        z = torch.randint(1 if version == 1 else 0, 2**bits, (groups, n))  # v1 cannot hold z = 0
        s = (torch.rand(groups, n) * 0.02 + 0.001).half()
        g_idx = torch.arange(k) // group_size
        if act_order:
            g_idx = g_idx[torch.randperm(k)]
        w = s.float()[g_idx] * (q - z[g_idx]).float()
        weights[name] = w.T
        linear.weight.data = w.T.contiguous()
        del tensors[f"{name}.weight"]
        tensors.update(
            {
                f"{name}.qweight": ref.write_qweight(q, bits),
                f"{name}.qzeros": ref.write_qzeros(z - (1 if version == 1 else 0), bits),
                f"{name}.scales": s,
                f"{name}.g_idx": g_idx.to(torch.int32),
            }
        )
    path.mkdir()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    qc = {"bits": bits, "group_size": group_size, "desc_act": act_order, "sym": False}
    if version == 2:
        qc["checkpoint_format"] = "gptq_v2"
    if in_config:
        model.config.quantization_config = {"quant_method": "gptq", **qc}
    model.config.save_pretrained(path)
    if not in_config:  # an AutoGPTQ-era checkpoint: quantize_config.json only
        (path / "quantize_config.json").write_text(json.dumps(qc))
    return model, weights


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("version", [1, 2])
def test_import_of_an_independently_written_checkpoint(tmp_path, bits, version):
    model, weights = write_gptq_checkpoint(tmp_path / "gptq", bits, version=version, in_config=version == 2)
    loaded = lowbit.load_gptq(tmp_path / "gptq")
    for name, w in weights.items():
        layer = loaded.get_submodule(name)
        assert type(layer) is lowbit.QuantLinear and layer.bits == bits
        assert torch.equal(float_weight(layer), w), name
    tokens = token_batch(model)
    torch.testing.assert_close(logits(loaded, tokens), logits(model, tokens), rtol=1e-4, atol=1e-4)
    assert loaded.lowbit_config.settings["checkpoint_format"] == ("gptq_v2" if version == 2 else "gptq")


@pytest.mark.parametrize("bits", BITS)
def test_act_order_import_is_exact(tmp_path, bits):
    model, weights = write_gptq_checkpoint(tmp_path / "gptq", bits, act_order=True)
    loaded = lowbit.load_gptq(tmp_path / "gptq")
    for name, w in weights.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, lowbit.PermutedQuantLinear)
        assert torch.equal(float_weight(layer), w), name
    tokens = token_batch(model)
    expected = logits(model, tokens)
    torch.testing.assert_close(logits(loaded, tokens), expected, rtol=1e-4, atol=1e-4)

    # a lowbit checkpoint keeps the permutation, and GPTQ export gives back the same g_idx
    lowbit.save_quantized(loaded, tmp_path / "lowbit")
    reloaded = lowbit.load_quantized(tmp_path / "lowbit")
    assert torch.equal(logits(reloaded, tokens), logits(loaded, tokens))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lowbit")
    assert isinstance(hf.model.layers[0].mlp.down_proj, lowbit.PermutedQuantLinear)
    assert torch.equal(logits(hf, tokens), logits(loaded, tokens))
    lowbit.export_gptq(reloaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "quantize_config.json").read_text())["desc_act"] is True
    original, again = read_checkpoint(tmp_path / "gptq"), read_checkpoint(tmp_path / "again")
    for name in weights:
        for t in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(again[f"{name}.{t}"], original[f"{name}.{t}"]), f"{name}.{t}"


def test_a_checkpoint_with_a_bad_permutation_is_refused(tmp_path):
    write_gptq_checkpoint(tmp_path / "gptq", 2, act_order=True)
    lowbit.save_quantized(lowbit.load_gptq(tmp_path / "gptq"), tmp_path / "lowbit")
    key = "model.layers.1.mlp.up_proj.input_perm"
    data = load_file(tmp_path / "lowbit" / "model.safetensors")
    data[key][:2] = 0
    save_file(data, tmp_path / "lowbit" / "model.safetensors", metadata={"format": "pt"})
    for load in (lowbit.load_quantized, transformers.AutoModelForCausalLM.from_pretrained):
        with pytest.raises(CheckpointError, match=f"{key} must be a permutation"):
            load(tmp_path / "lowbit")


def test_permuted_layer_matches_its_dense_weight():
    stored = lowbit.QuantLinear.from_linear(torch.nn.Linear(96, 40), 3, 32)  # weights in stored order
    perm = torch.randperm(96)
    permuted = lowbit.PermutedQuantLinear.from_permuted(stored, perm)
    inverse = torch.argsort(perm)
    assert torch.equal(permuted.codes(), stored.codes()[:, inverse])
    assert torch.equal(permuted.dequantize(), stored.dequantize()[:, inverse])
    x = torch.randn(5, 96)
    dense = float_weight(stored)[:, inverse]
    torch.testing.assert_close(permuted(x), x @ dense.T + stored.bias.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(permuted.dense_weight(), dense, rtol=0, atol=0)
    # An adapter reads the permuted input; merging keeps the permutation.
    A, B = torch.randn(4, 96) / 10, torch.randn(40, 4) / 10
    for layer in (stored, permuted):
        layer.attach_adapter(4, A=A, B=B)
    torch.testing.assert_close(permuted.dense_weight(), stored.dense_weight()[:, inverse], rtol=0, atol=0)
    merged = permuted.merge_and_requantize()
    assert type(merged) is lowbit.PermutedQuantLinear and merged.adapter is None
    assert torch.equal(merged.input_perm, permuted.input_perm)
    assert torch.equal(merged.dequantize(), stored.merge_and_requantize().dequantize()[:, inverse])
    with pytest.raises(ValueError, match="permutation of 0..95"):
        permuted.load_state_dict({**permuted.state_dict(), "input_perm": torch.zeros(96, dtype=torch.int32)})


# --- refusals ----------------------------------------------------------------------------


def edit_gptq(path, tensors=None, config=None):
    if tensors:
        data = load_file(path / "model.safetensors")
        tensors(data)
        save_file(data, path / "model.safetensors", metadata={"format": "pt"})
    if config:
        full = json.loads((path / "config.json").read_text())
        config(full["quantization_config"])
        (path / "config.json").write_text(json.dumps(full))


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "tensors, config, message",
    [
        (
            None,
            lambda qc: qc.update(checkpoint_format="marlin"),
            "checkpoint_format 'marlin' is not supported",
        ),
        (None, lambda qc: qc.update(bits=8), "bits must be 2, 3 or 4"),
        (None, lambda qc: qc.update(bits=2), rf"{Q}\.qweight has shape \[6, 64\], but bits=2"),
        (None, lambda qc: qc.update(group_size=64), rf"{Q}\.qzeros has shape .* group_size=64"),
        (None, lambda qc: qc.update(group_size=16), "group_size must be a multiple of 32"),
        (None, lambda qc: qc.pop("bits"), "lacks an integer 'bits'"),
        (None, lambda qc: qc.update(quant_method="lowbit"), "use lowbit.load_quantized"),
        (None, lambda qc: qc.update(dynamic={r"-:.*q_proj": {}}), rf"leaves {Q} in full precision"),
        (None, lambda qc: qc.update(dynamic={r"+:.*q_proj": {"bits": 4}}), rf"{Q}\.qweight .* bits=4"),
        (lambda t: t.pop(f"{Q}.qzeros"), None, rf"lacks tensor {Q}\.qzeros"),
        (lambda t: t.pop("model.norm.weight"), None, r"lacks tensor model\.norm\.weight"),
        (lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].long()}), None, "must be int32"),
        (
            lambda t: t[f"{Q}.scales"].view(-1)[0].fill_(float("inf")),
            None,
            rf"{Q}\.scales contains NaN or Inf",
        ),
        (lambda t: t[f"{Q}.g_idx"].view(-1)[-2:].fill_(0), None, "exactly 32 input channels"),
    ],
)
def test_bad_gptq_checkpoints_are_refused(tmp_path, tensors, config, message):
    write_gptq_checkpoint(tmp_path / "gptq", 3)
    edit_gptq(tmp_path / "gptq", tensors, config)
    with pytest.raises(CheckpointError, match=message):
        lowbit.load_gptq(tmp_path / "gptq")


def test_load_gptq_refuses_a_model_without_gptq_layers(tmp_path):
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no GPTQ layers"):
        lowbit.load_gptq(tmp_path / "plain")


# --- GPTQModel, when it can be imported -------------------------------------------------


def _gptqmodel():
    """GPTQModel's TorchLinear and v1 conversion: from an installed gptqmodel, or from the
    pure-python source tree named by LOWBIT_GPTQMODEL_SRC (its compiled parts are not needed;
    the package __init__ files, which pull in everything, are bypassed)."""
    try:
        torch_linear = importlib.import_module("gptqmodel.nn_modules.qlinear.torch")
        model_utils = importlib.import_module("gptqmodel.utils.model")
    except ImportError:
        src = os.environ.get("LOWBIT_GPTQMODEL_SRC")
        if not src:
            pytest.skip("GPTQModel is not importable (set LOWBIT_GPTQMODEL_SRC to its source tree)")
        for name, sub in (("gptqmodel", ""), ("gptqmodel.models", "models")):
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(src, sub)]
            sys.modules[name] = package
        sys.modules["gptqmodel"].DEBUG_ON = False
        torch_linear = importlib.import_module("gptqmodel.nn_modules.qlinear.torch")
        model_utils = importlib.import_module("gptqmodel.utils.model")
    return torch_linear.TorchLinear, model_utils


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
def test_layout_matches_gptqmodel(bits, act_order, monkeypatch):
    torch_linear, model_utils = _gptqmodel()
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")
    k, n, g = 256, 96, 64
    q = torch.randint(0, 2**bits, (k, n))
    z = torch.randint(1, 2**bits, (k // g, n))
    s = (torch.rand(k // g, n) * 0.1 + 0.01).half()
    g_idx = torch.arange(k) // g
    if act_order:
        g_idx = g_idx[torch.randperm(k)]
    w = s.float()[g_idx] * (q - z[g_idx]).float()
    dense = torch.nn.Linear(k, n, bias=False)
    dense.weight.data = w.T.contiguous()
    theirs = torch_linear(
        bits=bits,
        group_size=g,
        sym=False,
        desc_act=act_order,
        in_features=k,
        out_features=n,
        bias=False,
        register_buffers=True,
    )
    theirs.pack_block(dense, s.T.float(), z.T.float(), g_idx.to(torch.int32))
    tensors = {f"l.{t}": getattr(theirs, t).clone() for t in ("qweight", "qzeros", "scales", "g_idx")}

    ours = gptq.gptq_layer("l", tensors, k, n, bits, g, version=2)
    assert torch.equal(ours.dequantize().T, theirs.dequantize_weight())  # both in float16
    exported = gptq._gptq_tensors(ours)
    for t in ("qweight", "qzeros", "scales"):
        assert torch.equal(exported[t], tensors[f"l.{t}"]), t
    assert torch.equal(exported["g_idx"].long(), g_idx)

    model_utils.convert_gptq_v2_to_v1_format_module(
        theirs, types.SimpleNamespace(bits=bits, pack_dtype=torch.int32)
    )
    assert not torch.equal(theirs.qzeros, tensors["l.qzeros"])  # v1 stores z - 1
    v1 = gptq.gptq_layer("l", {**tensors, "l.qzeros": theirs.qzeros}, k, n, bits, g, version=1)
    assert torch.equal(float_weight(v1), w.T)
