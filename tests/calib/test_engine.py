"""The block-wise calibration engine on tiny random Llama, OPT and Qwen2 models."""

import copy

import pytest
import torch
from tiny import CharTokenizer, random_tokens, tiny_model
from torch import nn

import lowbit
from lowbit.calib import engine
from lowbit.calib.blocks import capture_block_inputs, decoder_blocks, run_block
from lowbit.calib.methods import METHODS, Method, Stage, register
from lowbit.calib.methods.lwc import ClippedLinear
from lowbit.errors import CheckpointMismatchError, CorruptCheckpointError
from lowbit.eval.perplexity import token_perplexity
from lowbit.nn.convert import dense_weights
from lowbit.quant.schemes import MethodSettings


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**kw):
    defaults = dict(bits=3, group_size=32, nsamples=8, seqlen=32, epochs=2, progress=False)
    return lowbit.QuantConfig(**{**defaults, **kw})


def block_outputs(model, tokens):
    """The output of every decoder block for `tokens`, via forward hooks."""
    _, blocks = decoder_blocks(model)
    outs = [None] * len(blocks)
    hooks = [
        b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i, b in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


# --- capture and data flow ---------------------------------------------------------------


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("opt", "eager"),
                                         ("opt", "sdpa"), ("qwen2", "sdpa")])
def test_captured_inputs_replay_the_model(family, attn):
    """Block inputs and keyword arguments recorded one window at a time, replayed on a
    batch of windows, give every block's output of the full model."""
    model = tiny_model(family, layers=3, attn=attn)
    tokens = random_tokens(5, 24)
    x, calls = capture_block_inputs(model, decoder_blocks(model)[1], tokens)
    assert x.shape == (5, 24, 64)
    expected = block_outputs(model, tokens)
    h = x
    with torch.no_grad():
        for i, block in enumerate(decoder_blocks(model)[1]):
            h = run_block(block, h, calls[i])
            torch.testing.assert_close(h, expected[i], rtol=1e-5, atol=1e-5)


def test_blocks_compute_again_after_capture():
    model = tiny_model("llama")
    tokens = random_tokens(2, 16)
    before = model(input_ids=tokens).logits
    capture_block_inputs(model, decoder_blocks(model)[1], tokens)
    assert torch.equal(model(input_ids=tokens).logits, before)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streams_follow_the_full_precision_and_the_quantized_model(family):
    """Each block's logged loss_after is the MSE between the quantized model's and the
    full-precision model's outputs of that block: the fp stream is the fp model's
    trajectory, the quantized stream the quantized model's."""
    model = tiny_model(family, layers=3)
    reference = copy.deepcopy(model)
    tokens = random_tokens(6, 32)
    report = lowbit.quantize(model, config(epochs=1, aug_loss=True, sw_weight=0.1), tokens)
    fp = block_outputs(reference, tokens)
    with dense_weights(model):
        quantized = block_outputs(model, tokens)
    for i, log in enumerate(report.blocks):
        mse = torch.mean((quantized[i] - fp[i]) ** 2).item()
        assert log.loss_after["mse"] == pytest.approx(mse, rel=1e-4)
        assert log.loss_before["mse"] > 0


# --- the result --------------------------------------------------------------------------


def test_result_uses_quantlinear_and_records_the_config():
    model = tiny_model("llama")
    cfg = config(epochs=1)
    report = lowbit.quantize(model, cfg, random_tokens())
    assert isinstance(model.lowbit_config, MethodSettings) and model.lowbit_config.method == "omniquant"
    recorded = model.lowbit_config.settings
    assert recorded["epochs"] == 1 and recorded["lr"] == {"clip": 1e-2}
    for i in range(2):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            layer = model.get_submodule(f"model.layers.{i}.{name}")
            assert isinstance(layer, lowbit.QuantLinear) and layer.bits == 3 and layer.group_size == 32
            assert f"model.layers.{i}.{name}" in report.quantized
    assert type(model.lm_head) is nn.Linear and "lm_head" in report.skipped
    assert [b.index for b in report.blocks] == [0, 1]
    assert all(b.epochs and b.seconds > 0 for b in report.blocks)


def test_overrides_and_skip_choose_each_layers_grid():
    model = tiny_model("llama")
    cfg = config(epochs=1, overrides={r"model\.layers\.0\..*": None, "down_proj": {"bits": 2},
                                      "gate_proj": {"group_size": 64}})
    report = lowbit.quantize(model, cfg, random_tokens())
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert "model.layers.0.mlp.down_proj" in report.skipped
    assert model.model.layers[1].mlp.down_proj.bits == 2
    assert model.model.layers[1].mlp.gate_proj.group_size == 64
    assert model.model.layers[1].mlp.gate_proj.bits == 3
    assert model.model.layers[1].self_attn.q_proj.group_size == 32


def test_rtn_method_equals_quantize_rtn():
    a, b = tiny_model("llama"), tiny_model("llama")
    lowbit.quantize(a, lowbit.QuantConfig(method="rtn", bits=2, group_size=32, progress=False))
    lowbit.quantize_rtn(b, bits=2, group_size=32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_exported_model_equals_the_fake_quantized_model(family):
    """QuantLinear (packed kernels) against the calibration stand-ins kept with
    export=False; both runs follow the same trajectory, so only the export differs."""
    exported, fake = tiny_model(family), tiny_model(family)
    tokens = random_tokens()
    cfg = config(bits=3, epochs=2, lr={"clip": 5e-2})
    lowbit.quantize(exported, cfg, tokens)
    lowbit.quantize(fake, cfg, tokens, export=False)
    assert any(isinstance(m, lowbit.QuantLinear) for m in exported.modules())
    assert not any(isinstance(m, lowbit.QuantLinear) for m in fake.modules())
    stream = torch.randint(0, 128, (4 * 32,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        la = exported(input_ids=stream.view(4, 32)).logits
        lb = fake(input_ids=stream.view(4, 32)).logits
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
    pa = token_perplexity(exported, stream, seqlen=32, progress=False)
    pb = token_perplexity(fake, stream, seqlen=32, progress=False)
    assert pa == pytest.approx(pb, rel=5e-3)


# --- training ----------------------------------------------------------------------------


TRAINED = [name for name, cls in METHODS.items() if cls.needs_data and name != "gptq"]  # gptq trains nothing
# Learning rates for a budget of a few dozen steps (the defaults assume thousands).
SHORT_BUDGET = {"omniquant": {"lr": {"clip": 0.1}}}


@pytest.mark.parametrize("method", TRAINED)
@pytest.mark.parametrize("sw_weight", [0.0, 0.1])
def test_each_method_lowers_every_block_loss(method, sw_weight):
    model = tiny_model("llama", layers=2)
    cfg = config(method=method, bits=2, epochs=4, sw_weight=sw_weight, **SHORT_BUDGET.get(method, {}))
    report = lowbit.quantize(model, cfg, random_tokens())
    for log in report.blocks:
        assert log.loss_after["mse"] < log.loss_before["mse"], log
    first, last = report.blocks[0].epochs[0], report.blocks[0].epochs[-1]
    assert last["loss"] < first["loss"]
    assert ("sw" in first) == (sw_weight > 0)


def test_opt_blocks_train_and_keep_their_biases():
    model = tiny_model("opt", attn="eager")
    report = lowbit.quantize(model, config(bits=2, epochs=4, lr={"clip": 0.1}), random_tokens())
    assert all(b.loss_after["mse"] < b.loss_before["mse"] for b in report.blocks)
    for name in ("self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"):
        layer = model.get_submodule(f"model.decoder.layers.1.{name}")
        assert isinstance(layer, lowbit.QuantLinear) and layer.bias is not None


def test_same_seed_same_model_other_seed_other_model():
    runs = []
    for seed in (0, 0, 1):
        model = tiny_model("llama", layers=1)
        lowbit.quantize(model, config(epochs=1, seed=seed, sw_weight=0.1, lr={"clip": 5e-2}), random_tokens())
        runs.append(model.model.layers[0].mlp.up_proj.scales.clone())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_trainable_flags_of_the_model_are_restored():
    model = tiny_model("llama", layers=1)
    lowbit.quantize(model, config(epochs=1), random_tokens())
    assert model.model.layers[0].input_layernorm.weight.requires_grad


def test_texts_are_cut_into_seeded_windows():
    model = tiny_model("llama", layers=1)
    texts = ["The quick brown fox jumps over the lazy dog. " * 20, "Pack my box with five dozen jugs. " * 20]
    report = lowbit.quantize(model, config(epochs=1, nsamples=3, seqlen=16), texts, CharTokenizer())
    assert model.lowbit_config.settings["nsamples"] == 3 and model.lowbit_config.settings["seqlen"] == 16
    assert report.config["seqlen"] == 16


def test_bad_calibration_inputs_are_refused():
    model = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match="needs calibration data"):
        lowbit.quantize(model, config(), None)
    with pytest.raises(ValueError, match="need a tokenizer"):
        lowbit.quantize(model, config(), ["some text"])
    with pytest.raises(TypeError, match="LongTensor"):
        lowbit.quantize(model, config(), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="token ids must lie"):
        lowbit.quantize(model, config(), torch.full((2, 8), 1000))
    with pytest.raises(ValueError, match="unknown method"):
        lowbit.quantize(model, config(method="nope"), random_tokens())
    lowbit.quantize(model, config(method="rtn"))
    with pytest.raises(ValueError, match="already holds QuantLinear"):
        lowbit.quantize(model, config(method="rtn"))


def test_non_finite_weights_are_refused():
    model = tiny_model("llama", layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj: lowbit: weight contains NaN or Inf"):
        lowbit.quantize(model, config(epochs=1), random_tokens())


# --- adding a method ---------------------------------------------------------------------


class TwoStageClipping(Method):
    """A method defined outside lowbit: two stages with their own parameters, learning
    rates and lengths (one in epochs, one in steps), and hooks that count their calls."""

    name = "two-stage-test"

    @classmethod
    def defaults(cls, config):
        return {"nsamples": 8, "seqlen": 32, "epochs": 1, "aug_loss": False,
                "lr": {"upper": 0.1, "lower": 0.05}, "weight_decay": {}}

    def wrap(self, layer, spec):
        return ClippedLinear(layer, spec.bits, spec.group_size, spec.scale_dtype)

    def stages(self):
        ws = self.wrappers.values()
        return [
            Stage("upper", [{"params": [w.upper for w in ws], "lr": self.config.lr["upper"]}],
                  epochs=self.config.epochs),
            Stage("lower", [{"params": [w.lower for w in ws], "lr": self.config.lr["lower"]}],
                  steps=3, optimizer=torch.optim.Adam, options={"scale": self.config.options.get("scale", 1.0)}),
        ]

    def begin_stage(self, stage):
        CALLS.append(("begin", self.block_index, stage.name))

    def after_step(self, stage):
        CALLS.append(("step", self.block_index, stage.name))

    def loss(self, pred, targets, stage):
        loss, terms = super().loss(pred, targets, stage)
        return loss * stage.options.get("scale", 1.0), terms

    def export(self, local_name, wrapper):
        return wrapper.to_quant_linear()


CALLS = []


@pytest.fixture
def two_stage_method():
    register(TwoStageClipping)
    CALLS.clear()
    yield TwoStageClipping.name
    METHODS.pop(TwoStageClipping.name)


def test_a_registered_method_runs_without_engine_changes(two_stage_method):
    model = tiny_model("llama", layers=2)
    report = lowbit.quantize(model, lowbit.QuantConfig(method=two_stage_method, group_size=32,
                                                       progress=False), random_tokens())
    # 8 windows, batch 1: one epoch of "upper" is 8 steps; "lower" is 3 steps.
    expected = [
        call
        for block in (0, 1)
        for call in [("begin", block, "upper")] + [("step", block, "upper")] * 8
        + [("begin", block, "lower")] + [("step", block, "lower")] * 3
    ]
    assert CALLS == expected
    assert [(e["stage"], e["epoch"]) for e in report.blocks[0].epochs] == [("upper", 1), ("lower", 1)]
    assert isinstance(model.model.layers[1].mlp.up_proj, lowbit.QuantLinear)


def test_a_diverging_loss_stops_the_run(two_stage_method):
    model = tiny_model("llama", layers=1)
    cfg = lowbit.QuantConfig(method=two_stage_method, group_size=32, progress=False,
                             options={"scale": float("nan")})
    with pytest.raises(FloatingPointError, match="block 0 became nan in stage 'lower'"):
        lowbit.quantize(model, cfg, random_tokens())


# --- checkpoints and resume --------------------------------------------------------------


def _interrupt_at(monkeypatch, block_index):
    original = engine._Run._calibrate_block

    def calibrate_block(self, i, streams):
        if i == block_index:
            raise KeyboardInterrupt
        return original(self, i, streams)

    monkeypatch.setattr(engine._Run, "_calibrate_block", calibrate_block)


def test_resumed_run_ends_bit_identical(tmp_path, monkeypatch):
    cfg = config(bits=2, epochs=2, sw_weight=0.1, aug_loss=True)
    tokens = random_tokens()
    uninterrupted = tiny_model("llama", layers=3)
    full_report = lowbit.quantize(uninterrupted, cfg, tokens)

    cached = lowbit.QuantConfig(**{**cfg.to_dict(), "cache_dir": str(tmp_path)})
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            lowbit.quantize(tiny_model("llama", layers=3), cached, tokens)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "block_0000.safetensors", "block_0001.safetensors", "manifest.json", "streams.safetensors"]

    resumed = tiny_model("llama", layers=3)
    report = lowbit.quantize(resumed, cached, tokens)
    assert [b.resumed for b in report.blocks] == [True, True, False]
    assert [b.loss_after for b in report.blocks] == [b.loss_after for b in full_report.blocks]
    a, b = uninterrupted.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_finished_checkpoints_rebuild_the_model(tmp_path):
    cfg = config(epochs=1, cache_dir=str(tmp_path))
    tokens = random_tokens()
    first = tiny_model("llama")
    lowbit.quantize(first, cfg, tokens)
    again = tiny_model("llama")
    report = lowbit.quantize(again, cfg, tokens)
    assert all(b.resumed for b in report.blocks)
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    # The same checkpoints also rebuild the fake-quantized model.
    fake = tiny_model("llama")
    lowbit.quantize(fake, cfg, tokens, export=False)
    assert isinstance(fake.model.layers[0].mlp.up_proj, ClippedLinear)
    with torch.no_grad():
        torch.testing.assert_close(fake(input_ids=tokens).logits, first(input_ids=tokens).logits,
                                   rtol=1e-4, atol=1e-4)


def test_mismatched_checkpoints_are_refused(tmp_path):
    cfg = config(epochs=1, cache_dir=str(tmp_path))
    tokens = random_tokens()
    lowbit.quantize(tiny_model("llama", layers=1), cfg, tokens)
    with pytest.raises(CheckpointMismatchError, match="calibration data"):
        lowbit.quantize(tiny_model("llama", layers=1), cfg, random_tokens(seed=7))
    with pytest.raises(CheckpointMismatchError, match="quantization settings"):
        lowbit.quantize(tiny_model("llama", layers=1), config(epochs=2, cache_dir=str(tmp_path)), tokens)
    with pytest.raises(CheckpointMismatchError, match="model weights"):
        lowbit.quantize(tiny_model("llama", layers=1, seed=3), cfg, tokens)
    with pytest.raises(CheckpointMismatchError, match="number of blocks"):
        lowbit.quantize(tiny_model("llama", layers=2), cfg, tokens)
    # Settings that do not change the result do not matter.
    quiet = config(epochs=1, cache_dir=str(tmp_path), progress=True)
    lowbit.quantize(tiny_model("llama", layers=1), quiet, tokens)


def test_corrupt_checkpoints_are_reported(tmp_path):
    cfg = config(epochs=1, cache_dir=str(tmp_path))
    tokens = random_tokens()
    lowbit.quantize(tiny_model("llama", layers=1), cfg, tokens)
    (tmp_path / "streams.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptCheckpointError, match="delete"):
        lowbit.quantize(tiny_model("llama", layers=1), cfg, tokens)
