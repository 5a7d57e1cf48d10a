"""Tokenization, calibration windows and perplexity."""

import math

import pytest
import torch
from tiny import CharTokenizer, tiny_model

import lowbit
from lowbit.calib.data import calibration_windows, token_stream
from lowbit.eval.perplexity import token_perplexity
from lowbit.nn.convert import dense_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_token_stream_joins_with_a_blank_line_and_adds_no_bos():
    ids = token_stream(CharTokenizer(), ["ab", "c"])
    assert ids.tolist() == [ord(c) % 128 for c in "ab\n\nc"]


def test_calibration_windows_are_seeded_slices_of_the_stream():
    texts = ["".join(chr(32 + (i * 7) % 90) for i in range(500))]
    stream = token_stream(CharTokenizer(), texts)
    a = calibration_windows(CharTokenizer(), texts, 6, 20, seed=0)
    assert a.shape == (6, 20) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(CharTokenizer(), texts, 6, 20, seed=0))
    assert not torch.equal(a, calibration_windows(CharTokenizer(), texts, 6, 20, seed=1))
    for window in a:
        starts = [s for s in range(len(stream) - 19) if torch.equal(stream[s:s + 20], window)]
        assert starts


def test_too_little_text_is_refused():
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(CharTokenizer(), ["short"], 2, 64, 0)
    with pytest.raises(TypeError, match="list of strings"):
        token_stream(CharTokenizer(), "not a list")


def test_perplexity_is_the_exp_of_the_mean_window_loss():
    """Independent check: the model's own shifted cross-entropy per window (all windows
    have the same number of predicted tokens)."""
    model = tiny_model("llama")
    tokens = torch.randint(0, 128, (5 * 24 + 7,))
    with torch.no_grad():
        losses = [model(input_ids=w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item()
                  for w in tokens[: 5 * 24].view(5, 24)]
    assert token_perplexity(model, tokens, seqlen=24, progress=False) == pytest.approx(
        math.exp(sum(losses) / 5), rel=1e-5)
    assert token_perplexity(model, tokens, seqlen=24, max_windows=2, progress=False) == pytest.approx(
        math.exp(sum(losses[:2]) / 2), rel=1e-5)
    text = "".join(chr(c + 32) for c in range(90)) * 3
    assert lowbit.perplexity(model, CharTokenizer(), [text], seqlen=24, progress=False) == pytest.approx(
        token_perplexity(model, token_stream(CharTokenizer(), [text]), 24, progress=False))
    with pytest.raises(ValueError, match="fewer than one window"):
        token_perplexity(model, tokens[:10], seqlen=24)


def test_dense_weights_compute_the_quantlinear_model_and_restore_it():
    model = tiny_model("llama")
    lowbit.quantize_rtn(model, bits=3, group_size=32)
    tokens = torch.randint(0, 128, (3, 16))
    with torch.no_grad():
        packed = model(input_ids=tokens).logits
        with dense_weights(model):
            assert not any(isinstance(m, lowbit.QuantLinear) for m in model.modules())
            dense = model(input_ids=tokens).logits
    assert isinstance(model.model.layers[0].mlp.up_proj, lowbit.QuantLinear)
    torch.testing.assert_close(dense, packed, rtol=1e-4, atol=1e-4)
