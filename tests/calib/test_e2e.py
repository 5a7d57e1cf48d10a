"""The end-to-end stage: scales (and adapters) trained against the full-precision logits
with the codes frozen; exact export, resume, refusals."""

import pytest
import torch
from tiny import random_tokens, tiny_model

import lowbit
from lowbit.calib import e2e
from lowbit.calib.e2e import ScaleTunedLinear, kl_divergence
from lowbit.errors import CorruptCheckpointError, UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**kw):
    defaults = dict(bits=2, group_size=32, nsamples=8, seqlen=32, epochs=1, lr={"clip": 0.1}, progress=False,
                    e2e_lr={"scale": 1e-2, "lora": 1e-3})
    return lowbit.QuantConfig(**{**defaults, **kw})


def quant_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, lowbit.QuantLinear)}


def kl_to(reference, model, tokens):
    with torch.no_grad():
        return kl_divergence(reference(input_ids=tokens).logits, model(input_ids=tokens).logits).item()


def test_stand_in_exports_exactly_what_it_computes():
    layer = lowbit.QuantLinear.from_linear(torch.nn.Linear(96, 40), 3, 32)
    layer.attach_adapter(4, 8.0, B=torch.randn(40, 4, generator=torch.Generator().manual_seed(1)))
    stand_in = ScaleTunedLinear(layer)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(stand_in(x), layer(x), rtol=2e-3, atol=2e-3)
        stand_in.factor.mul_(1 + 0.05 * torch.randn(stand_in.factor.shape, generator=torch.Generator().manual_seed(3)))
        exported = stand_in.to_quant_linear()
        torch.testing.assert_close(exported(x), stand_in(x), rtol=2e-3, atol=2e-3)
    assert torch.equal(exported.codes(), layer.codes()) and torch.equal(exported.zeros, layer.zeros)
    assert not torch.equal(exported.scales, layer.scales)
    assert exported.adapter is not None and exported.adapter.A.dtype == layer.adapter.A.dtype


def test_end_to_end_lowers_the_kl_and_keeps_codes_and_zeros():
    tokens = random_tokens()
    reference = tiny_model("llama", layers=2)
    block_wise = tiny_model("llama", layers=2)
    lowbit.quantize(block_wise, config(), tokens)
    tuned = tiny_model("llama", layers=2)
    report = lowbit.quantize(tuned, config(e2e_epochs=4), tokens)

    kls = [entry["kl"] for entry in report.end_to_end]
    assert len(kls) == 4 and kls[-1] < kls[0]
    assert kl_to(reference, tuned, tokens) < kl_to(reference, block_wise, tokens)
    before, after = quant_layers(block_wise), quant_layers(tuned)
    assert before.keys() == after.keys() and len(after) == 14
    for name, layer in after.items():
        assert torch.equal(layer.codes(), before[name].codes()), name
        assert torch.equal(layer.zeros, before[name].zeros), name
    assert any(not torch.equal(layer.scales, before[name].scales) for name, layer in after.items())
    assert "end to end  KL" in str(report)


def test_adapters_train_too():
    tokens = random_tokens()
    models = {}
    for epochs in (0, 2):
        models[epochs] = tiny_model("llama", layers=1)
        lowbit.quantize(models[epochs], config(method="apiq", lora_rank=4, e2e_epochs=epochs), tokens)
    a, b = quant_layers(models[0]), quant_layers(models[2])
    assert any(not torch.equal(a[n].adapter.B, b[n].adapter.B) for n in a)


def test_interrupted_end_to_end_resumes_bit_identical(tmp_path, monkeypatch):
    tokens = random_tokens()
    cfg = config(e2e_epochs=3)
    uninterrupted = tiny_model("llama", layers=2)
    full = lowbit.quantize(uninterrupted, cfg, tokens)

    cached = lowbit.QuantConfig(**{**cfg.to_dict(), "cache_dir": str(tmp_path)})
    original = e2e.EndToEnd._epoch

    def interrupted(self, epoch, optimizer):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch, optimizer)

    with monkeypatch.context() as m:
        m.setattr(e2e.EndToEnd, "_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            lowbit.quantize(tiny_model("llama", layers=2), cached, tokens)
    assert (tmp_path / "end_to_end.safetensors").exists()
    resumed = tiny_model("llama", layers=2)
    report = lowbit.quantize(resumed, cached, tokens)
    assert report.end_to_end == full.end_to_end
    a, b = uninterrupted.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_corrupt_end_to_end_checkpoint_is_reported(tmp_path):
    tokens = random_tokens()
    cfg = config(e2e_epochs=1, cache_dir=str(tmp_path))
    lowbit.quantize(tiny_model("llama", layers=1), cfg, tokens)
    (tmp_path / "end_to_end.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CorruptCheckpointError, match="end_to_end.safetensors"):
        lowbit.quantize(tiny_model("llama", layers=1), cfg, tokens)


@pytest.mark.parametrize("kw,message", [
    (dict(method="rtn", lr={}, e2e_epochs=1), "needs a method that calibrates"),
    (dict(e2e_epochs=-1), "e2e_epochs"),
    (dict(e2e_lr={"clip": 1.0}), "e2e_lr has the groups"),
    (dict(e2e_lr={"scale": float("nan")}), "e2e_lr"),
])
def test_bad_end_to_end_settings_are_refused(kw, message):
    with pytest.raises(UsageError, match=message):
        lowbit.quantize(tiny_model("llama", layers=1), config(**kw), random_tokens())


def test_end_to_end_needs_the_exported_layers():
    with pytest.raises(UsageError, match="export=True"):
        lowbit.quantize(tiny_model("llama", layers=1), config(e2e_epochs=1), random_tokens(), export=False)
