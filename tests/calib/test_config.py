"""QuantConfig: validation, per-layer settings, method defaults and JSON round trips."""

import json

import pytest

from lowbit import QuantConfig
from lowbit.calib.methods import get_method
from lowbit.quant.schemes import Scheme


def test_json_round_trip_keeps_every_field():
    cfg = QuantConfig(bits=2, group_size=128, sw_weight=0.1, lr={"clip": 5e-3}, skip=("lm_head", "gate"),
                      overrides={r"model\.layers\.0\..*": None, "down_proj": {"bits": 4}},
                      options={"clip_init": 3.0}, cache_dir="/tmp/x", seed=5)
    back = QuantConfig.from_json(cfg.to_json())
    assert back == cfg and isinstance(back.skip, tuple)
    assert json.loads(cfg.to_json())["skip"] == ["lm_head", "gate"]
    # the first matching override wins: the order survives the (key-sorting) JSON
    assert list(back.overrides) == [r"model\.layers\.0\..*", "down_proj"]


def test_overrides_may_be_given_as_ordered_pairs():
    cfg = QuantConfig(overrides=[["down_proj", {"bits": 2}], ["mlp.down_proj", None]])
    assert list(cfg.overrides) == ["down_proj", "mlp.down_proj"]
    assert cfg.scheme("model.layers.0.mlp.down_proj") == Scheme(2, 64)


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match=r"unknown QuantConfig fields \['bitz'\]"):
        QuantConfig.from_dict({"bitz": 3})


@pytest.mark.parametrize("kw,match", [
    ({"bits": 5}, "bits must be 2, 3 or 4"),
    ({"group_size": 48}, "group_size must be a positive multiple of 32"),
    ({"sw_weight": 1.5}, "sw_weight must be in"),
    ({"sw_projections": 0}, "sw_projections must be at least 1"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"epochs": -1}, "epochs must be >= 0"),
    ({"scale_dtype": "int8"}, "scale_dtype must be"),
    ({"overrides": {"(": None}}, "not a valid regular expression"),  # lowbit.quant.schemes' checks
])
def test_bad_values_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kw)


def test_scheme_applies_the_rule_of_lowbit_quant_schemes_with_the_configs_settings():
    cfg = QuantConfig(bits=2, group_size=128, skip=("gate_proj",),
                      overrides=[["up_proj", {"bits": 4}], ["gate_proj", {"group_size": 32}]])
    assert cfg.scheme("model.layers.0.mlp.up_proj") == Scheme(4, 128)
    assert cfg.scheme("model.layers.0.mlp.gate_proj") == Scheme(2, 32)  # an override beats skip
    assert cfg.scheme("lm_head") == Scheme(2, 128)  # this skip replaces the default one
    assert cfg.scheme("model.layers.0.mlp.down_proj") == Scheme(2, 128)
    assert QuantConfig(skip=("down_proj",)).scheme("model.layers.0.mlp.down_proj") is None


def test_method_defaults_fill_only_what_is_left_open():
    omni = get_method("omniquant")
    w3 = QuantConfig(bits=3).resolved(omni.defaults(QuantConfig(bits=3)))
    assert (w3.nsamples, w3.seqlen, w3.epochs, w3.aug_loss, w3.lr) == (128, 2048, 20, False, {"clip": 1e-2})
    w2 = QuantConfig(bits=2).resolved(omni.defaults(QuantConfig(bits=2)))
    assert (w2.epochs, w2.aug_loss, w2.weight_decay) == (40, True, {"clip": 0.0})
    mine = QuantConfig(bits=2, epochs=3, aug_loss=False, lr={"clip": 0.1})
    mine = mine.resolved(omni.defaults(mine))
    assert (mine.epochs, mine.aug_loss, mine.lr, mine.nsamples) == (3, False, {"clip": 0.1}, 128)
    rtn = QuantConfig(method="rtn").resolved(get_method("rtn").defaults(QuantConfig()))
    assert (rtn.nsamples, rtn.epochs) == (0, 0)


def test_fingerprint_ignores_where_files_go():
    a = QuantConfig(cache_dir="/a", progress=True).fingerprint_dict()
    b = QuantConfig(cache_dir="/b", progress=False).fingerprint_dict()
    assert a == b
    assert a != QuantConfig(seed=1).fingerprint_dict()
