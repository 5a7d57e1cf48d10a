"""Loading lowbit checkpoints through transformers' `from_pretrained` (lowbit.io.hf, which
`import lowbit` registers without importing transformers)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from checkpoint_tools import assert_same_quant_layers, quantized, rewrite_tensors
from tiny import logits, tiny_llama, tiny_opt, token_batch

import lowbit
from lowbit.errors import CheckpointError
from lowbit.io.checkpoint import load_quantized, save_quantized

ROOT = Path(__file__).resolve().parents[2]


def test_from_pretrained_matches_load_quantized(tmp_path):
    model = quantized(tiny_opt(), 3, 32, overrides={"fc1": {"bits": 2}})
    tokens = token_batch(model)
    save_quantized(model, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert_same_quant_layers(model, hf)
    assert torch.equal(logits(hf, tokens), logits(model, tokens))
    assert hf.lowbit_config.method == "rtn"


def test_from_pretrained_refuses_missing_and_nan_tensors(tmp_path):
    save_quantized(quantized(tiny_llama()), tmp_path / "ckpt")
    rewrite_tensors(tmp_path / "ckpt", lambda t: t.pop("model.layers.0.mlp.up_proj.zeros"))
    with pytest.raises(CheckpointError, match=r"lacks tensor model\.layers\.0\.mlp\.up_proj\.zeros"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    save_quantized(quantized(tiny_llama()), tmp_path / "ckpt")
    rewrite_tensors(
        tmp_path / "ckpt", lambda t: t["model.layers.1.mlp.down_proj.scales"].view(-1)[5].fill_(float("nan"))
    )
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.scales contains NaN"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_import_lowbit_alone_registers_with_transformers(tmp_path):
    """In a fresh interpreter: `import lowbit` must not import transformers, yet
    from_pretrained must find the lowbit quantizer afterwards."""
    model = quantized(tiny_llama())
    tokens = token_batch(model)
    save_quantized(model, tmp_path / "ckpt")
    torch.save({"tokens": tokens, "logits": logits(model, tokens)}, tmp_path / "expected.pt")
    script = (
        "import sys, torch, lowbit\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad(): assert torch.equal(m(e['tokens']).logits, e['logits'])\n"
        "assert type(m.model.layers[0].mlp.up_proj).__name__ == 'QuantLinear'\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=300)


@pytest.mark.parametrize("writer", ["save_quantized", "save_pretrained"])
def test_a_process_without_lowbit_is_told_to_import_it(tmp_path, writer):
    """Without lowbit's quantizer, transformers would skip the unknown quant_method and load
    random weights; the checkpoint's attention request (LOAD_GUARD) stops it, naming lowbit."""
    save_quantized(quantized(tiny_llama()), tmp_path / "ckpt")
    if writer == "save_pretrained":  # a model loaded by transformers, saved by it
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").save_pretrained(tmp_path / "again")
    path = tmp_path / ("ckpt" if writer == "save_quantized" else "again")
    script = (
        "import sys, transformers\n"
        f"try: transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
        "except ValueError as exc: print(exc)\n"
        "else: print('loaded')\n"
        "assert 'lowbit' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=True)
    assert "`import lowbit` (pip install lowbit) before loading this model" in done.stdout
    original = load_quantized(tmp_path / "ckpt")  # lowbit itself reads past the guard
    tokens = token_batch(original)
    assert torch.equal(logits(load_quantized(path), tokens), logits(original, tokens))


def test_from_pretrained_quantizes_a_full_precision_model_on_load(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "fp")
    overrides = {"down_proj": {"bits": 4}, "model.layers.1.self_attn.o_proj": None}
    request = lowbit.LowbitConfig(bits=3, group_size=32, method="rtn", overrides=overrides)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=request)
    expected = quantized(model, 3, 32, overrides=overrides)
    assert_same_quant_layers(expected, loaded)
    assert type(loaded.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    tokens = token_batch(model)
    assert torch.equal(logits(loaded, tokens), logits(expected, tokens))

    loaded.save_pretrained(tmp_path / "q")
    for again in (load_quantized(tmp_path / "q"), transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")):
        assert_same_quant_layers(expected, again)
        assert torch.equal(logits(again, tokens), logits(expected, tokens))
    assert dict(load_quantized(tmp_path / "q").lowbit_config.to_dict()["overrides"]) == overrides


def test_quantizing_on_load_refuses_calibrated_methods_and_bad_settings(tmp_path):
    with pytest.raises(ValueError, match=r"round-to-nearest only .*`lowbit quantize --method omniquant`"):
        lowbit.LowbitConfig(bits=3, method="omniquant")
    with pytest.raises(ValueError, match="bits"):
        lowbit.LowbitConfig(bits=5)
    with pytest.raises(ValueError, match="group_size"):
        lowbit.LowbitConfig(group_size=48)
    with pytest.raises(ValueError, match="unknown: \\['nsamples'\\]"):
        lowbit.LowbitConfig(nsamples=8)
    save_quantized(quantized(tiny_llama()), tmp_path / "ckpt")
    tiny_llama().save_pretrained(tmp_path / "fp")
    saved = lowbit.LowbitConfig(**json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"])
    with pytest.raises(ValueError, match="describes a saved checkpoint"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=saved)
