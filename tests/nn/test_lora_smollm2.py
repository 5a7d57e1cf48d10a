"""LoRA fine-tuning of the default model, quantized to 3 bits (lowbit.nn.lora, peft).

Marked slow: needs SmolLM2-135M-Instruct and the State of the Union texts (lowbit.io.assets);
skipped cleanly when they cannot be fetched.
"""

import pytest
import torch

import lowbit
from lowbit.calib.data import sample_windows, token_stream
from lowbit.errors import AssetError
from lowbit.io import assets
from lowbit.nn import QuantLinear

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow


def test_lora_on_the_3_bit_default_model_lowers_the_loss_on_held_out_text(tmp_path):
    try:
        model, tokenizer = assets.load_model()
        train_stream = token_stream(tokenizer, assets.load_texts("sotu", "calibration"))
        held_out = token_stream(tokenizer, assets.load_texts("sotu", "evaluation"))
    except AssetError as exc:
        pytest.skip(f"the default model or texts are not available: {exc}")
    lowbit.quantize_rtn(model, bits=3, group_size=64)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    packed = [layer.packed.clone() for layer in layers]
    config = lowbit.peft_config(peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft_model = peft.get_peft_model(model, config)
    evaluation = sample_windows(held_out, 2, 128, seed=1)

    def held_out_loss():
        peft_model.eval()
        with torch.no_grad():
            return peft_model(input_ids=evaluation, labels=evaluation).loss.item()

    before = held_out_loss()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    for step in range(8):
        batch = sample_windows(train_stream, 2, 128, seed=100 + step)
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = held_out_loss()
    assert after < before - 0.02, (before, after)
    assert all(torch.equal(layer.packed, p) for layer, p in zip(layers, packed))

    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 2e6  # the adapter alone
