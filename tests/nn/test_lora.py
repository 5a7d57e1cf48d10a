"""LoRA fine-tuning of lowbit models with peft (lowbit.nn.lora): training, gradient
checkpointing, Trainer, saving and reloading the adapter, merging into the codes."""

import warnings

import pytest
import torch
import transformers
from tiny import tiny_llama

import lowbit
from lowbit.nn import QuantLinear
from lowbit.nn.lora import QuantLoraLinear

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def lowbit_llama():
    model = tiny_llama(layers=2)
    lowbit.quantize_rtn(model, bits=3, group_size=32)
    return model


def lora(model, **settings):
    config = lowbit.peft_config(peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, **settings))
    return peft.get_peft_model(model, config)


def periodic_batch(vocab, batch=4, length=48, period=6):
    """Sequences that repeat a random motif: learnable by attention in a few steps."""
    motif = torch.randint(0, vocab, (batch, period))
    return motif.repeat(1, length // period)


def quantized_buffers(layers):
    return [b.clone() for layer in layers for b in (layer.packed, layer.scales, layer.zeros)]


def train(model, ids, steps, lr=3e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_trains_the_adapters_and_leaves_the_packed_weights(one_thread):
    model = lowbit_llama()
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    before = quantized_buffers(layers)
    peft_model = lora(model)
    wrapped = [m for m in peft_model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(wrapped) == 2 * len(TARGETS)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    losses = train(peft_model, periodic_batch(model.config.vocab_size), steps=16)
    assert losses[-1] < losses[0] - 0.3, losses  # (about 0.5 to 1 nat in 16 steps)
    after = quantized_buffers(layers)
    assert len(before) == 3 * 7 * 2 and all(torch.equal(b, a) for b, a in zip(before, after))
    assert all(not b.requires_grad and b.grad is None for layer in layers for b in layer.buffers())


def test_gradient_checkpointing_reaches_the_adapters(one_thread):
    peft_model = lora(lowbit_llama())
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    peft_model.enable_input_require_grads()
    peft_model.train()
    ids = periodic_batch(peft_model.config.vocab_size)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]  # (A's is 0 while B = 0)
    assert len(grads) == 2 * len(TARGETS) and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_trainer_fine_tunes_a_model_loaded_by_from_pretrained(tmp_path, one_thread):
    lowbit.save_quantized(lowbit_llama(), tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert model.hf_quantizer.is_trainable
    peft_model = lora(model)
    ids = periodic_batch(model.config.vocab_size, batch=8)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4, learning_rate=2e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    trainer = transformers.Trainer(model=peft_model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed


@pytest.mark.parametrize("load", ["load_quantized", "from_pretrained"])
def test_adapter_saves_and_reloads_on_a_fresh_base(tmp_path, load, one_thread):
    lowbit.save_quantized(lowbit_llama(), tmp_path / "base")
    peft_model = lora(lowbit.load_quantized(tmp_path / "base"))
    ids = periodic_batch(peft_model.config.vocab_size)
    train(peft_model, ids, steps=3)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    base = (lowbit.load_quantized(tmp_path / "base") if load == "load_quantized"
            else transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    config = lowbit.peft_config(peft.LoraConfig.from_pretrained(tmp_path / "adapter"))
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", config=config)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)


def test_merge_and_unload_rounds_the_change_onto_the_grid(one_thread):
    model = lowbit_llama()
    peft_model = lora(model)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # a change of about a quantization step, so that merging moves codes
            torch.nn.init.normal_(p, std=0.3)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.get_base_layer()
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach() * layer.scaling["default"]
    target = base.dense_weight() + delta
    expected_codes = torch.round(
        (target.reshape(base.out_features, -1, base.group_size) / base.scales.float().unsqueeze(-1))
        + base.zeros.float().unsqueeze(-1)
    ).clamp(0, 7).reshape(target.shape)

    merged = peft_model.merge_and_unload()
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is QuantLinear and q_proj.adapter is None
    assert torch.equal(q_proj.codes().float(), expected_codes)
    assert not torch.equal(q_proj.codes(), base.codes())
    assert torch.equal(q_proj.scales, base.scales) and torch.equal(q_proj.zeros, base.zeros)


def test_merge_warns_when_rounding_loses_the_change_and_unmerge_restores(one_thread):
    peft_model = lora(lowbit_llama())
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1e-4)  # far below a quantization step
    layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    original = layer.get_base_layer()
    with pytest.warns(UserWarning, match="rounds away most of its change"):
        peft_model.merge_adapter()
    assert layer.get_base_layer() is not original
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_model.unmerge_adapter()
    assert layer.get_base_layer() is original


def test_unsupported_settings_are_refused(one_thread):
    with pytest.raises(ValueError, match="lora_bias"):
        lora(lowbit_llama(), lora_bias=True)
    with pytest.raises(ValueError, match="DoRA"):
        lora(lowbit_llama(), use_dora=True)
    with pytest.raises(TypeError, match="LoraConfig"):
        lowbit.peft_config({"r": 8})
