"""apiq: learnable clipping plus low-rank adapters, and the saliency regularizer."""

import pytest
import torch
from tiny import random_tokens, tiny_model
from torch import nn

import lowbit
from lowbit.calib.blocks import decoder_blocks
from lowbit.calib.methods import LayerSpec
from lowbit.calib.methods.apiq import AdaptedLinear, ApiQ, saliency_penalty
from lowbit.nn import QuantLinear


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**kw):
    defaults = dict(method="apiq", bits=2, group_size=32, nsamples=8, seqlen=32, epochs=2, lora_rank=8,
                    lr={"lora": 1e-3, "clip": 1e-2}, progress=False)
    return lowbit.QuantConfig(**{**defaults, **kw})


def adapted(n=64, k=64, rank=8, bits=2, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=False)
    spec = LayerSpec("layer", bits, 32, torch.float16)
    return AdaptedLinear(linear, spec, rank, 16.0, torch.Generator().manual_seed(seed))


# --- the method on a model ---------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {},
    {"saliency": True},
    {"saliency": True, "reg_variant": "after_lora", "stage_epochs": {"wpt": 1, "mixedt": 1, "opt": 1}},
    {"saliency": True, "sw_weight": 0.1},
    {"sw_weight": 0.2, "bits": 3},
])
def test_apiq_lowers_every_block_loss_and_exports_adapters(kw):
    model = tiny_model()
    report = lowbit.quantize(model, config(**kw), random_tokens())
    for log in report.blocks:
        assert log.loss_after["mse"] < log.loss_before["mse"]
    layers = [m for m in decoder_blocks(model)[1].modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    for layer in layers:
        assert layer.adapter is not None and layer.adapter.rank == 8
        assert layer.adapter.A.dtype == torch.float16 and layer.adapter.B.abs().sum() > 0
        assert layer.adapter.scale.item() == pytest.approx(16.0 / 8)
    stages = [e["stage"] for e in report.blocks[0].epochs]
    if kw.get("saliency"):
        assert "wpt" in stages and "reg" in report.blocks[0].epochs[0]
    if kw.get("sw_weight"):
        last = report.blocks[0].epochs[-1]
        assert "sw" in last and "mse" in last  # both terms logged


def test_exported_adapters_compute_what_was_trained():
    """The model with stand-ins (export=False) and the exported QuantLinear model agree up to
    the fp16 storage of the adapters."""
    tokens = random_tokens()
    fake, real = tiny_model(), tiny_model()
    lowbit.quantize(fake, config(), tokens, export=False)
    lowbit.quantize(real, config(), tokens)
    with torch.no_grad():
        a = fake(input_ids=tokens[:2]).logits
        b = real(input_ids=tokens[:2]).logits
    assert (a - b).abs().max() < 1e-2 * a.abs().max()


def test_wpt_with_before_lora_trains_only_the_clipping():
    model = tiny_model(layers=1)
    cfg = config(saliency=True, stage_epochs={"wpt": 2, "mixedt": 0, "opt": 0})
    report = lowbit.quantize(model, cfg, random_tokens())
    regs = [e["reg"] for e in report.blocks[0].epochs]
    assert regs[-1] < regs[0]
    for layer in decoder_blocks(model)[1].modules():
        if isinstance(layer, QuantLinear):
            assert layer.adapter.B.abs().sum() == 0  # no gradient reached the adapters


def test_saliency_directory_and_resume(tmp_path):
    tokens = random_tokens()
    s_dir = lowbit.compute_saliency(tiny_model(), tokens, out_dir=tmp_path / "s", progress=False)
    a, b = tiny_model(), tiny_model()
    lowbit.quantize(a, config(saliency=str(s_dir)), tokens)
    lowbit.quantize(b, config(saliency=True, cache_dir=str(tmp_path / "run")), tokens)
    assert (tmp_path / "run" / "saliency" / "block_0001.safetensors").exists()
    c = tiny_model()
    report = lowbit.quantize(c, config(saliency=True, cache_dir=str(tmp_path / "run")), tokens)
    assert all(log.resumed for log in report.blocks)
    with torch.no_grad():
        la, lb, lc = (m(input_ids=tokens[:2]).logits for m in (a, b, c))
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    torch.testing.assert_close(lc, lb, rtol=0, atol=0)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="need saliency"):
        lowbit.quantize(tiny_model(), config(stage_epochs={"wpt": 1}), random_tokens())
    with pytest.raises(ValueError, match="stages"):
        lowbit.quantize(tiny_model(), config(saliency=True, stage_epochs={"warmup": 1}), random_tokens())
    with pytest.raises(FileNotFoundError):
        lowbit.quantize(tiny_model(), config(saliency=str(tmp_path)), random_tokens())
    with pytest.raises(ValueError, match="reg_variant"):
        config(reg_variant="during_lora")
    with pytest.raises(ValueError, match="lora_rank"):
        config(lora_rank=0)


def test_defaults_follow_the_published_recipes():
    cfg = lowbit.QuantConfig(method="apiq").resolved(ApiQ.defaults(lowbit.QuantConfig(method="apiq")))
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.epochs, cfg.aug_loss) == (64, 16.0, 20, True)
    assert cfg.lr == {"lora": 5e-4, "clip": 5e-3} and cfg.weight_decay == {"lora": 0.1, "clip": 0.1}
    assert cfg.stage_epochs == {"opt": 20}
    with_s = lowbit.QuantConfig(method="apiq", saliency=True)
    assert with_s.resolved(ApiQ.defaults(with_s)).stage_epochs == {"wpt": 15, "mixedt": 0, "opt": 5}
    mine = lowbit.QuantConfig(method="apiq", saliency=True, epochs=4, stage_epochs={"mixedt": 2})
    assert mine.resolved(ApiQ.defaults(mine)).stage_epochs == {"wpt": 3, "mixedt": 2, "opt": 1}


# --- the regularizer ---------------------------------------------------------------------


def test_penalty_is_zero_at_the_original_weight_and_linear_in_saliency():
    w = torch.randn(16, 32)
    s = torch.rand(16, 32) + 0.1
    w_hat = w + 0.05 * torch.randn_like(w)
    assert saliency_penalty(s, w, w) == 0
    base = saliency_penalty(s, w_hat, w)
    assert base > 0
    torch.testing.assert_close(saliency_penalty(3 * s, w_hat, w), 3 * base)
    bumped = s.clone()
    bumped[0, 0] += 10.0
    assert saliency_penalty(bumped, w_hat, w) > base


def test_after_lora_regularizer_vanishes_when_the_adapter_restores_w():
    """A full-rank adapter holding W - Q(W) makes the effective weight W: R = 0."""
    layer = adapted(n=64, k=64, rank=64)
    layer.saliency = torch.rand(64, 64) + 0.1
    w = layer.linear.weight.detach()
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(64))
        layer.lora_B.copy_((w - layer.fake_weight()) / layer.lora_scale)
    assert layer.weighted_error("after_lora").item() < 1e-9 * (layer.saliency * w.square()).sum()
    assert layer.weighted_error("before_lora") > 0  # Q(W) itself is off the weight


def test_block_regularizer_grows_where_saliency_meets_the_error():
    """R = sum S (W^ - W)^2 / sum S W^2 is a saliency-weighted mean of the relative errors:
    scaling S changes nothing; moving saliency onto the weights with the largest relative
    error raises it."""
    method = ApiQ(config(saliency="unused", reg_variant="before_lora").resolved(
        ApiQ.defaults(config())), block_index=0, num_blocks=1)
    layer = adapted()
    method.wrappers = {"layer": layer}
    w = layer.linear.weight.detach()
    error = (layer.fake_weight().detach() - w).square()

    def r_with(s):
        layer.saliency = s
        method.reference = (s * w.square()).sum().item()
        return method.regularizer().item()

    uniform = r_with(torch.ones_like(w))
    assert r_with(torch.full_like(w, 7.0)) == pytest.approx(uniform, rel=1e-5)
    relative = error / w.square()
    on_error = torch.ones_like(w) + 50 * (relative > relative.median()).float()
    assert r_with(on_error) > 1.5 * uniform
    off_error = torch.ones_like(w) + 50 * (relative <= relative.median()).float()
    assert r_with(off_error) < uniform
    assert 0 < uniform < 1


def test_weight_only_stages_skip_the_block_forward_pass():
    """wpt's loss depends on the weights alone: its steps run no block forward pass."""

    def block_calls(stage_epochs):
        model = tiny_model(layers=1)
        calls = []
        decoder_blocks(model)[1][0].register_forward_hook(lambda *_: calls.append(1))
        lowbit.quantize(model, config(saliency=True, stage_epochs=stage_epochs), random_tokens())
        return len(calls)

    untrained = block_calls({"wpt": 0, "mixedt": 0, "opt": 0})
    assert block_calls({"wpt": 3, "mixedt": 0, "opt": 0}) == untrained
    assert block_calls({"wpt": 0, "mixedt": 0, "opt": 1}) == untrained + 8  # one epoch of 8 windows
