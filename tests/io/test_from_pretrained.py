"""Loading lowbit checkpoints through transformers' `from_pretrained` (lowbit.io.hf, which
`import lowbit` registers without importing transformers)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from checkpoint_tools import assert_same_quant_layers, quantized, rewrite_tensors
from tiny import logits, tiny_llama, tiny_opt, token_batch

from lowbit.errors import CheckpointError
from lowbit.io.checkpoint import save_quantized

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
