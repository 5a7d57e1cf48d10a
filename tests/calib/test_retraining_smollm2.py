"""apiq on the real SmolLM2-135M at 3 bits (slow: downloads the model once, a few minutes)."""

import pytest
import torch

import lowbit
from lowbit.calib.data import calibration_windows, token_stream
from lowbit.eval.perplexity import token_perplexity
from lowbit.io import assets
from lowbit.nn.convert import dense_weights

pytestmark = pytest.mark.slow


def wiki_perplexity(model, stream):
    with dense_weights(model):
        return token_perplexity(model, stream, seqlen=512, max_windows=3, progress=False)


def test_apiq_beats_rtn_by_a_wide_margin_at_3_bits():
    model, tokenizer = assets.load_model()
    stream = token_stream(tokenizer, assets.load_texts("wiki", "evaluation"))
    fp = wiki_perplexity(model, stream)
    tokens = calibration_windows(tokenizer, assets.load_texts("sotu", "calibration"), 4, 256, seed=0)

    rtn, _ = assets.load_model()
    lowbit.quantize(rtn, lowbit.QuantConfig(method="rtn", bits=3, group_size=64, progress=False))
    # the budget of bench/retraining_quality.py (about a minute here)
    config = lowbit.QuantConfig(method="apiq", bits=3, group_size=64, epochs=2, lr={"clip": 0.1, "lora": 1e-3},
                                weight_decay={"clip": 0.1, "lora": 0.1}, progress=False)
    report = lowbit.quantize(model, config, tokens)
    assert all(b.loss_after["mse"] < b.loss_before["mse"] for b in report.blocks)

    ppl_rtn, ppl_apiq = wiki_perplexity(rtn, stream), wiki_perplexity(model, stream)
    assert torch.isfinite(torch.tensor(ppl_apiq))
    # apiq closes at least 40 % of rtn's gap to full precision
    assert ppl_apiq - fp < 0.6 * (ppl_rtn - fp), (fp, ppl_rtn, ppl_apiq)
