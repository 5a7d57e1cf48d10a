"""The per-module rule of lowbit.quant.schemes, used by QuantConfig, quantize_rtn and checkpoints:
the first matching override, then skip, then the default."""

import pytest

from lowbit.quant.schemes import Scheme, check_overrides, resolve_scheme

OVERRIDES = {
    r"model\.layers\.0\..*": None,  # a regular expression over the whole name
    "down_proj": {"bits": 2},  # the last dotted component
    "mlp.down_proj": {"bits": 4},  # never reached: the pattern above matches first
    "q_proj": {"group_size": -1},
    "model.layers.1.self_attn.o_proj": {"bits": 4, "group_size": 128},  # opts a skipped layer in
}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.layers.0.mlp.down_proj", None),  # the first match keeps it in full precision
        ("model.layers.3.mlp.down_proj", Scheme(2, 64)),  # first match; the default group size
        ("model.layers.3.self_attn.q_proj", Scheme(3, -1)),
        ("model.layers.1.self_attn.o_proj", Scheme(4, 128)),  # an override beats skip
        ("model.layers.2.self_attn.o_proj", None),  # skip
        ("lm_head", None),
        ("model.layers.3.self_attn.k_proj", Scheme(3, 64)),  # the default
        ("model.layers.10.self_attn.k_proj", Scheme(3, 64)),  # the regex must match the whole name
    ],
)
def test_first_override_then_skip_then_default(name, expected):
    assert resolve_scheme(name, 3, 64, OVERRIDES, skip=("lm_head", "o_proj")) == expected


def test_default_skip_and_the_order_of_stored_pairs():
    assert resolve_scheme("lm_head", 3, 32) is None
    assert resolve_scheme("lm_head", 3, 32, {"lm_head": {"bits": 4}}) == Scheme(4, 32)
    pairs = [["down_proj", {"bits": 2}], [".*", {"bits": 4}]]  # the form checkpoints store
    assert resolve_scheme("model.layers.1.mlp.down_proj", 3, 32, pairs) == Scheme(2, 32)
    assert resolve_scheme("model.layers.1.mlp.down_proj", 3, 32, pairs[::-1]) == Scheme(4, 32)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"(": {"bits": 2}}, "not a valid regular expression"),
        ({"q_proj": {"bits": 5}}, "bits must be 2, 3 or 4"),
        ({"q_proj": {"group_size": 48}}, r"override 'q_proj': group_size must be a positive multiple of 32"),
        ({"q_proj": {"bitz": 2}}, "keys 'bits' and/or 'group_size'"),
        ([["q_proj"]], "must map patterns"),
    ],
)
def test_bad_overrides_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        check_overrides(bad)
