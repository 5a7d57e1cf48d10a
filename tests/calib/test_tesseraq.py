"""tesseraq: progressive adaptive rounding with dequantization scale tuning."""

import pytest
import torch
from tiny import random_tokens, tiny_model
from torch import nn

import lowbit
from lowbit.calib.blocks import decoder_blocks
from lowbit.calib.methods import LayerSpec
from lowbit.calib.methods.tesseraq import HARD, RoundingLinear, TesseraQ, rectified_sigmoid
from lowbit.nn import QuantLinear
from lowbit.quant.grid import grouped


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**kw):
    defaults = dict(method="tesseraq", bits=2, group_size=32, nsamples=8, seqlen=32, rounding_steps=6,
                    rounding_thresholds=(0.5, 0.25, 0.1), stage_epochs={"lwc": 1}, progress=False)
    return lowbit.QuantConfig(**{**defaults, **kw})


def rounding_layer(bits=2, n=48, k=96, train_clip=True, init=4.0):
    linear = nn.Linear(k, n)
    layer = RoundingLinear(linear, LayerSpec("layer", bits, 32, torch.float16), clip_init=init, train_clip=train_clip)
    return layer


@pytest.mark.parametrize("kw", [{}, {"rounding_init": "minmax"}, {"sw_weight": 0.1}, {"bits": 3, "aug_loss": True}])
def test_tesseraq_lowers_every_block_loss(kw):
    model = tiny_model()
    report = lowbit.quantize(model, config(**kw), random_tokens())
    for log in report.blocks:
        assert log.loss_after["mse"] < log.loss_before["mse"]
        stages = [e["stage"] for e in log.epochs]
        assert stages[-3:] == ["par1", "par2", "par3"]
        assert ("lwc" in stages) == (kw.get("rounding_init") != "minmax")
        if kw.get("sw_weight"):
            assert "sw" in log.epochs[-1] and "mse" in log.epochs[-1]
    for layer in decoder_blocks(model)[1].modules():
        if isinstance(layer, QuantLinear):
            assert layer.adapter is None


def test_rounding_starts_at_the_weight_and_hardening_keeps_the_soft_fraction():
    layer = rounding_layer(init=100.0)  # min-max range
    layer.start_rounding()
    w = layer.linear.weight.detach()
    # h = frac(W / s) and a DST factor of 1 reproduce W wherever W lies on the integer
    # grid's range (the integer zero shifts the range by less than a step against min-max)
    x = grouped(w, 32) / layer.grid_scales + layer.grid_zeros
    inside = ((x >= 0) & (x <= layer.maxq)).reshape(w.shape)
    assert inside.float().mean() > 0.8  # at 2 bits up to half of one of 3 steps is cut
    torch.testing.assert_close(layer.fake_weight()[inside], w[inside], rtol=1e-5, atol=1e-6)
    for t in (0.8, 0.3, 0.05):
        layer.harden(t)
        h = rectified_sigmoid(layer.alpha)
        hard = layer.alpha.abs() == HARD
        assert ((h[hard] == 0) | (h[hard] == 1)).all()
        assert layer.soft_fraction() == pytest.approx(t, abs=2 / layer.alpha.numel())
        # the weights left soft are those with h closest to 0.5
        assert (h[~hard] - 0.5).abs().max() <= (h[hard] - 0.5).abs().min()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hardened_codes_are_integers_in_range_and_exact(bits):
    layer = rounding_layer(bits)
    layer.start_rounding()
    with torch.no_grad():
        layer.alpha.add_(torch.randn_like(layer.alpha))  # arbitrary training state
        layer.scale_logit.copy_(0.3 * torch.randn_like(layer.scale_logit))
    layer.harden(0.2)
    codes, scales, zeros = layer.quantized()
    assert codes.dtype == torch.uint8 and codes.max() <= 2**bits - 1
    assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 2**bits - 1
    # the codes are the floor or the ceiling of W / s on the frozen grid
    w = grouped(layer.linear.weight.detach().float(), 32)
    lower = (torch.floor(w / layer.grid_scales) + layer.grid_zeros).clamp(0, 2**bits - 1)
    step = grouped(codes.float(), 32) - lower
    assert ((step == 0) | (step == 1)).all()
    # fully hardened, the stand-in computes exactly the exported QuantLinear
    layer.harden(0.0)
    exported = layer.to_quant_linear()
    torch.testing.assert_close(exported.dense_weight(), layer.fake_weight().detach(), rtol=0, atol=0)
    # the DST factor is folded into the stored scale
    factor = 2 * torch.sigmoid(layer.scale_logit.detach().squeeze(-1))
    torch.testing.assert_close(exported.scales.float(), (factor * layer.grid_scales.squeeze(-1)).half().float())


def test_minmax_without_training_is_round_to_nearest():
    model, reference = tiny_model(), tiny_model()
    lowbit.quantize(model, config(rounding_init="minmax", rounding_steps=0), random_tokens())
    lowbit.quantize_rtn(reference, 2, 32)
    ours = dict(decoder_blocks(model)[1].named_modules())
    for name, layer in decoder_blocks(reference)[1].named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(ours[name].codes(), layer.codes())
            assert torch.equal(ours[name].scales, layer.scales) and torch.equal(ours[name].zeros, layer.zeros)


def test_stand_ins_and_export_agree_and_checkpoints_resume(tmp_path):
    tokens = random_tokens()
    fake, real = tiny_model(), tiny_model()
    lowbit.quantize(fake, config(), tokens, export=False)
    lowbit.quantize(real, config(cache_dir=str(tmp_path)), tokens)
    resumed = tiny_model()
    report = lowbit.quantize(resumed, config(cache_dir=str(tmp_path)), tokens)
    assert all(log.resumed for log in report.blocks)
    with torch.no_grad():
        a, b, c = (m(input_ids=tokens[:2]).logits for m in (fake, real, resumed))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_defaults_and_bad_settings():
    cfg = lowbit.QuantConfig(method="tesseraq")
    cfg = cfg.resolved(TesseraQ.defaults(cfg))
    assert len(cfg.rounding_thresholds) == 20 and cfg.rounding_steps == 250 and cfg.aug_loss is False
    assert cfg.rounding_init == "omniquant" and cfg.weight_decay["scale"] == 1e-4
    with pytest.raises(ValueError, match="decrease"):
        lowbit.QuantConfig(method="tesseraq", rounding_thresholds=(0.2, 0.5))
    with pytest.raises(ValueError, match="rounding_init"):
        lowbit.QuantConfig(method="tesseraq", rounding_init="awq")
    with pytest.raises(ValueError, match="lwc"):
        lowbit.quantize(tiny_model(), config(stage_epochs={"opt": 1}), random_tokens())
