"""The lean decoding path on the default model (SmolLM2-135M-Instruct, quantized W3 g64
round-to-nearest): the same greedy tokens as transformers' generate, logits close.

Marked slow: the first run downloads the model (about 93 MB) into the lowbit cache."""

import pytest
import torch
from transformers import GenerationConfig

from lowbit import kernels
from lowbit.errors import AssetError
from lowbit.io import assets
from lowbit.nn import quantize_rtn
from lowbit.nn.decoding import Decoding

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def smollm2_w3g64():
    try:
        model, tokenizer = assets.load_model()
    except AssetError as exc:
        pytest.skip(f"the default model is unavailable: {exc}")
    quantize_rtn(model, 3, 64)
    model.generation_config.eos_token_id = None  # all 64 tokens, whatever they are
    return model, tokenizer(PROMPT, return_tensors="pt").input_ids


def steps(model, decoding, ids):
    """Tokens and each step's logits (fp32) of greedy decoding on `decoding`'s path."""
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    logits = []
    if decoding.lean is None:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                             output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.cat(out.logits)

    def choose(seen, step_logits):
        logits.append(step_logits)
        return step_logits.argmax(dim=-1)

    return decoding.lean.generate(ids, NEW_TOKENS, choose), torch.cat(logits)


@pytest.mark.parametrize("exact", [True, False])
def test_lean_path_decodes_what_transformers_decodes(smollm2_w3g64, exact):
    model, ids = smollm2_w3g64
    with kernels.use_cpu_exact(exact), torch.inference_mode():
        expected, expected_logits = steps(model, Decoding(model, "transformers", "model"), ids)
        lean = Decoding(model, "lean", "model")
        assert lean.lean.fused_projections == 60
        tokens, logits = steps(model, lean, ids)
    assert tokens.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(tokens, expected)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
