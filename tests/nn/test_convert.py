"""quantize_rtn on whole models: what is replaced, what is reported, and that the
QuantLinear model computes exactly what its dequantized weights compute."""

import copy

import pytest
import torch
import transformers
from helpers import rel_err
from tiny import tiny_model
from torch import nn

import lowbit
from lowbit.nn import QuantLinear
from lowbit.nn.modules import linear_layers, set_submodule
from lowbit.quant.schemes import name_matches


def tiny_llama():
    """A Llama whose down_proj has in_features 160 (five blocks of 32), fresh weights."""
    return tiny_model("llama", seed=None, vocab_size=256, intermediate_size=160, max_position_embeddings=128)


def dequantized_copy(model):
    """The same model with every QuantLinear turned back into an fp32 nn.Linear."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.to(torch.float32).dequantize())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            set_submodule(plain, name, linear)
    return plain


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantized_llama_logits_equal_dequantized_weights(bits):
    model = tiny_llama()
    report = lowbit.quantize_rtn(model, bits, group_size=32)
    assert len(report.quantized) == 2 * 7
    assert report.skipped == {"lm_head": "matches a skip pattern"}
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        logits = model(ids).logits
        expected = dequantized_copy(model)(ids).logits
    assert rel_err(logits, expected) < 1e-5


def test_rtn_changes_the_model_but_keeps_it_close_at_4_bits():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        before = model(ids).logits
        lowbit.quantize_rtn(model, 4, group_size=32)
        after = model(ids).logits
    assert 0 < rel_err(after, before) < 0.2


def test_incompatible_layers_are_reported_and_left_alone():
    model = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 8), nn.Linear(8, 64))
    with pytest.warns(UserWarning, match="not quantizing") as warned:
        report = lowbit.quantize_rtn(model, 2, group_size=32, skip=())
    assert [str(w.message) for w in warned] == [
        "lowbit: not quantizing 2: in_features=40 is not a multiple of 32",
        "lowbit: not quantizing 3: in_features=8 is not a multiple of 32",
    ]
    assert warned[0].filename == __file__
    assert report.quantized == ["0"]
    assert set(report.skipped) == {"2", "3"}
    assert type(model[2]) is nn.Linear and type(model[3]) is nn.Linear
    assert "skipped 2: in_features=40 is not a multiple of 32" in str(report)


def test_group_size_that_does_not_divide_is_reported():
    model = nn.Sequential(nn.Linear(96, 8))
    with pytest.warns(UserWarning, match="group_size=64 does not divide in_features=96"):
        report = lowbit.quantize_rtn(model, 3, group_size=64)
    assert report.quantized == []


def test_layers_skipped_for_one_reason_share_one_warning():
    """A group size that misses every layer of one width warns once, not once per layer."""
    model = nn.Sequential(nn.Linear(96, 96), nn.Linear(96, 96), nn.Linear(96, 128), nn.Linear(128, 8),
                          nn.Linear(96, 8))
    with pytest.warns(UserWarning, match="not quantizing") as warned:
        report = lowbit.quantize_rtn(model, 3, group_size=64)
    assert [str(w.message) for w in warned] == [
        "lowbit: not quantizing 4 layers (0, 1 and 2 more): group_size=64 does not divide in_features=96 "
        "in multiples of 32",
    ]
    assert warned[0].filename == __file__
    assert report.quantized == ["3"] and set(report.skipped) == {"0", "1", "2", "4"}


def test_calibration_warns_once_per_reason():
    model = tiny_llama()  # down_proj: in_features 160
    with pytest.warns(UserWarning, match="not quantizing") as warned:
        report = lowbit.quantize(model, lowbit.QuantConfig(bits=3, group_size=64, method="rtn", progress=False))
    assert [str(w.message) for w in warned if "not quantizing" in str(w.message)] == [
        "lowbit: not quantizing 2 layers (model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj): "
        "group_size=64 does not divide in_features=160 in multiples of 32",
    ]
    assert warned[0].filename == __file__
    assert {name for name, reason in report.skipped.items() if "does not divide" in reason} == {
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


def test_nan_weights_name_the_layer():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="0: lowbit: weight contains NaN"):
        lowbit.quantize_rtn(model, 2, group_size=32)


def test_gpt2_conv1d_layers_are_converted_with_their_orientation():
    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 128, (1, 12))
    lowbit.quantize_rtn(model, 4, group_size=32)
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, QuantLinear) and (attn.in_features, attn.out_features) == (64, 192)
    with torch.no_grad():
        logits = model(ids).logits
        expected = dequantized_copy(model)(ids).logits
    assert rel_err(logits, expected) < 1e-5


def test_skip_patterns():
    assert name_matches("lm_head", "lm_head")
    assert name_matches("model.layers.0.mlp.down_proj", "mlp.down_proj")
    assert name_matches("model.layers.0.mlp.down_proj", r".*\.0\..*")
    assert not name_matches("model.layers.10.mlp.down_proj", r".*\.0\..*")
    assert not name_matches("model.layers.0.mlp.down_proj", "proj")
    model = tiny_llama()
    report = lowbit.quantize_rtn(model, 2, group_size=32, skip=("lm_head", "down_proj"))
    assert len(report.quantized) == 2 * 6
    assert all(not isinstance(m, QuantLinear) or "down_proj" not in n
               for n, m in linear_layers(model).items())
