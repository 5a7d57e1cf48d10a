"""The lean decoding path against transformers' generate, stacked QuantLinear rows against
the separate layers, the decoding lm_heads against their references, and the fallback."""

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model, tiny_opt
from transformers import GenerationConfig

from lowbit import kernels
from lowbit.errors import UsageError
from lowbit.nn import QuantLinear, quantize_rtn
from lowbit.nn.decoding import Decoding
from lowbit.nn.lean_decode import LeanDecoder, lean_unsupported
from lowbit.nn.lm_head import BFloat16Linear, decoding_lm_head, describe_lm_head


def quant_layer(n, k=128, bits=3, group_size=32, bias=False):
    layer = torch.nn.Linear(k, n, bias=bias)
    return QuantLinear.from_linear(layer, bits, group_size)


# --- stacked rows ----------------------------------------------------------------------


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_concat_rows_equals_the_separate_layers_bit_for_bit(exact, bits, rows):
    layers = [quant_layer(n, bits=bits, bias=True) for n in (96, 32, 32)]
    fused = QuantLinear.concat_rows(layers)
    x = torch.randn(rows, 128)
    with kernels.use_cpu_exact(exact), torch.inference_mode():
        separate = torch.cat([layer(x) for layer in layers], dim=-1)
        assert torch.equal(fused(x), separate)
    assert torch.equal(fused.codes(), torch.cat([layer.codes() for layer in layers]))


def test_concat_rows_refuses_layers_that_do_not_stack():
    base = quant_layer(32)
    with pytest.raises(UsageError, match="differ"):
        QuantLinear.concat_rows([base, quant_layer(32, bits=4)])
    with pytest.raises(UsageError, match="differ"):
        QuantLinear.concat_rows([base, quant_layer(32, k=64)])
    with pytest.raises(UsageError, match="not a plain QuantLinear"):
        QuantLinear.concat_rows([base, torch.nn.Linear(128, 32)])
    adapted = quant_layer(32)
    adapted.attach_adapter(4)
    with pytest.raises(UsageError, match="adapter"):
        QuantLinear.concat_rows([base, adapted])
    with pytest.raises(UsageError, match="at least one"):
        QuantLinear.concat_rows([])


# --- the lean path against transformers --------------------------------------------------


def reference_generate(model, ids, n, head=None, **sampling):
    """transformers' generate, with `head` as the lm_head: the tokens and each step's logits."""
    own = model.lm_head
    model.lm_head = head if head is not None else own
    model.generation_config.eos_token_id = None  # else generate stops at the config's EOS
    try:
        config = GenerationConfig(max_new_tokens=n, do_sample=bool(sampling), pad_token_id=0, eos_token_id=None,
                                  **sampling)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                             output_logits=True, return_dict_in_generate=True)
    finally:
        model.lm_head = own
    return out.sequences, torch.cat(out.logits)


def lean_generate(decoder, ids, n):
    """The lean decoder's greedy tokens and each step's logits."""
    steps = []

    def choose(seen, logits):
        steps.append(logits)
        return logits.argmax(dim=-1)

    return decoder.generate(ids, n, choose), torch.cat(steps)


def tiny_quantized(family="llama"):
    model = tiny_model(family, layers=3)
    quantize_rtn(model, 3, 32)
    # transformers' generate falls back to the model's EOS token where a GenerationConfig
    # leaves it unset: without this, a greedy run that draws it stops early there only
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("quantized", [True, False])
def test_lean_path_matches_transformers(exact, family, quantized):
    model = tiny_quantized(family) if quantized else tiny_model(family, layers=3)
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    decoder = LeanDecoder(model)
    assert decoder.fused_projections == (2 * 3 if quantized else 0)
    with kernels.use_cpu_exact(exact), torch.inference_mode():
        expected, expected_logits = reference_generate(model, ids, 24)
        tokens, logits = lean_generate(decoder, ids, 24)
    assert torch.equal(tokens, expected)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_lean_path_grows_its_cache_and_keeps_what_it_holds():
    """Tokens fed one by one past the reserved length give the same logits as one forward pass."""
    model = tiny_quantized()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    decoder = LeanDecoder(model)
    with torch.inference_mode():
        full = model(ids).logits[0]
        steps = [decoder.forward(ids[:, :3], 0)] + [decoder.forward(ids[:, p:p + 1], p) for p in range(3, 12)]
    torch.testing.assert_close(torch.cat(steps), full[2:], rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="only as a prompt"):
        decoder.forward(ids[:, :2], 5)


def test_lean_sampling_draws_what_transformers_draws():
    model = tiny_quantized()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    sampling = dict(temperature=0.8, top_k=20, top_p=0.9)
    config = GenerationConfig(max_new_tokens=16, do_sample=True, eos_token_id=None, pad_token_id=0, **sampling)
    with torch.inference_mode():
        torch.manual_seed(3)
        expected, _ = reference_generate(model, ids, 16, **sampling)
        torch.manual_seed(3)
        tokens = Decoding(model, "lean", "model").generate(ids, config)
    assert torch.equal(tokens, expected)


def test_lean_path_stops_at_eos():
    model = tiny_quantized()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.inference_mode():
        free = LeanDecoder(model).generate(ids, 10)
        eos = int(free[0, 7])  # the third new token
        stopped = LeanDecoder(model).generate(ids, 10, eos_token_ids=(eos,))
    first = (free[0, 5:] == eos).nonzero()[0, 0] + 5
    assert torch.equal(stopped, free[:, :first + 1])


def test_models_the_lean_path_does_not_cover_fall_back_to_transformers():
    model = tiny_opt()
    assert "opt models are not covered" in lean_unsupported(model)
    decoding = Decoding(model, "lean", "model")
    assert decoding.lean is None and "transformers' generate: opt models" in decoding.describe()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected, _ = reference_generate(model, ids, 6)
    assert torch.equal(decoding.generate(ids, config), expected)
    with pytest.raises(UsageError, match="does not support this model: opt"):
        LeanDecoder(model)
    with pytest.raises(UsageError, match="unknown decoding path"):
        Decoding(model, "fast")


def test_unsupported_activation_and_rope_are_named():
    assert "activation 'gelu'" in lean_unsupported(tiny_model("llama", hidden_act="gelu"))
    dynamic = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert "rotary embedding 'dynamic'" in lean_unsupported(dynamic)


# --- decoding lm_heads -------------------------------------------------------------------


def test_bf16_lm_head_is_the_bf16_product():
    head = torch.nn.Linear(64, 300, bias=False)
    x = torch.randn(2, 64)
    copy = decoding_lm_head(head, "bf16")
    assert isinstance(copy, BFloat16Linear)
    expected = F.linear(x.bfloat16(), head.weight.detach().bfloat16()).float()
    assert torch.equal(copy(x), expected)


FP16_HALF_STEP = 0.5 + 15 * 2**-11 + 2**-8


def test_q4_lm_head_is_its_round_to_nearest_weight():
    head = torch.nn.Linear(64, 300, bias=False)
    q4 = decoding_lm_head(head, "q4")
    assert (q4.bits, q4.group_size, q4.scales.dtype) == (4, 32, torch.float16)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(q4(x), x @ q4.dense_weight().T, rtol=1e-5, atol=1e-5)
        # within half a step per weight of the original, plus the fp16 rounding of the
        # scale (2^-11 of 15 steps) and of the zero (2^-8 of a step below 8)
        step = q4.scales.float().repeat_interleave(32, 1)
        assert ((q4.dense_weight() - head.weight).abs() <= FP16_HALF_STEP * step).all()


def test_q4r_lm_head_adds_a_rounded_residual():
    head = torch.nn.Linear(64, 300)
    q4r = decoding_lm_head(head, "q4r")
    first = decoding_lm_head(head, "q4")
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(q4r(x), x @ q4r.dense_weight().T + head.bias, rtol=1e-5, atol=1e-5)
        # the first half is q4 itself; the residual's error is half a step of its own grid
        assert torch.equal(q4r.stacked.codes()[:300], first.codes())
        step = q4r.stacked.scales[300:].float().repeat_interleave(32, 1)
        assert ((q4r.dense_weight() - head.weight).abs() <= FP16_HALF_STEP * step).all()
        assert (q4r.dense_weight() - head.weight).abs().max() < (first.dense_weight() - head.weight).abs().max() / 8


@pytest.mark.parametrize("rows", [1, 3])
def test_q4t_lm_head_refines_the_top_candidates_of_q4(rows):
    """q4's logits, with q4r's in place of q4's `candidates` largest of each row; one row
    (which reads only the candidates' residual rows) agrees with a row of many."""
    out = int(torch.randint(70, 400, ()))
    head = torch.nn.Linear(64, out)
    q4t, q4r, q4 = (decoding_lm_head(head, choice) for choice in ("q4t", "q4r", "q4"))
    assert torch.equal(q4t.first.codes(), q4.codes()) and torch.equal(q4t.second.codes(), q4r.stacked.codes()[out:])
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        y, first, refined = q4t(x), q4t.first(x), q4r(x)
        top = first.topk(64, dim=-1).indices
        expected = first.scatter(-1, top, (refined - head.bias).gather(-1, top)) + head.bias
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(y.argmax(-1), refined.argmax(-1))
        one_at_a_time = torch.cat([q4t(x[i:i + 1]) for i in range(rows)])
        torch.testing.assert_close(one_at_a_time, q4t(x.view(rows, 1, 64)).view(rows, -1), rtol=1e-5, atol=1e-5)
    assert describe_lm_head(q4t) == "4-bit g32 lm_head, 4+4-bit for its top 64"


def test_q4t_takes_every_output_of_a_head_with_fewer_than_its_candidates():
    head = torch.nn.Linear(32, 40, bias=False)
    q4t, q4r = decoding_lm_head(head, "q4t"), decoding_lm_head(head, "q4r")
    x = torch.randn(1, 32)
    with torch.inference_mode():
        torch.testing.assert_close(q4t(x), q4r(x), rtol=1e-5, atol=1e-5)


def test_lm_head_choices_keep_what_they_should_and_refuse_the_rest():
    head = torch.nn.Linear(64, 300, bias=False)
    assert decoding_lm_head(head, "model") is head
    quantized = QuantLinear.from_linear(head, 4, 32)
    assert decoding_lm_head(quantized, "bf16") is quantized
    with pytest.raises(UsageError, match="unknown lm_head choice 'int8'"):
        decoding_lm_head(head, "int8")
    with pytest.raises(UsageError, match="not a multiple of 32"):
        decoding_lm_head(torch.nn.Linear(40, 300), "q4")


def test_decoding_with_a_q4_head_leaves_the_model_unchanged():
    model = tiny_quantized()
    own = model.lm_head
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    lean = Decoding(model, "lean", "q4")
    via_transformers = Decoding(model, "transformers", "q4")
    with torch.inference_mode():
        assert torch.equal(lean.generate(ids, config), via_transformers.generate(ids, config))
    assert model.lm_head is own
    assert "4-bit g32 lm_head" in lean.describe() and "lean path (6 fused" in lean.describe()
