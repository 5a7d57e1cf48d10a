"""Tokenization, calibration windows and perplexity."""

import math

import pytest
import torch
from tiny import CharTokenizer, tiny_model

import lowbit
from lowbit.calib.data import calibration_windows, token_stream
from lowbit.eval.perplexity import evaluate_tokens, token_perplexity
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


def test_evaluate_against_a_reference_matches_a_direct_computation():
    """KL(reference || model) per predicted token, top-1 agreement and both perplexities,
    recomputed here with torch's kl_div over all windows at once."""
    reference = tiny_model("llama", seed=None)
    model = tiny_model("llama", seed=None)
    model.load_state_dict(reference.state_dict())
    lowbit.quantize_rtn(model, bits=2, group_size=32)
    seqlen, windows = 20, 4
    tokens = torch.randint(0, 128, (windows * seqlen + 5,))
    result = evaluate_tokens(model, tokens, seqlen, reference=reference, progress=False)

    batch = tokens[: windows * seqlen].view(windows, seqlen)
    with torch.no_grad():
        log_q = torch.log_softmax(model(batch).logits[:, :-1].double(), -1)
        log_p = torch.log_softmax(reference(batch).logits[:, :-1].double(), -1)
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).flatten()
    targets = batch[:, 1:].unsqueeze(-1)
    assert result.windows == windows and result.seqlen == seqlen
    assert result.kl_mean == pytest.approx(kl.mean().item(), rel=1e-4) and result.kl_mean > 0
    assert result.kl_median == pytest.approx(torch.quantile(kl, 0.5).item(), rel=1e-4)
    assert result.kl_p99 == pytest.approx(torch.quantile(kl, 0.99).item(), rel=1e-4)
    assert result.top1_agreement == (log_q.argmax(-1) == log_p.argmax(-1)).double().mean().item()
    assert result.perplexity == pytest.approx(math.exp(-log_q.gather(-1, targets).mean().item()), rel=1e-5)
    assert result.reference_perplexity == pytest.approx(math.exp(-log_p.gather(-1, targets).mean().item()),
                                                        rel=1e-5)
    assert result.perplexity_ratio == pytest.approx(result.perplexity / result.reference_perplexity)
    assert result.to_dict()["perplexity_ratio"] == result.perplexity_ratio


def test_evaluate_a_model_against_itself_and_without_a_reference():
    model = tiny_model("llama", seed=None)
    text = "".join(chr(c + 32) for c in range(90)) * 3
    same = lowbit.evaluate(model, CharTokenizer(), [text], seqlen=24, reference=model, progress=False)
    assert same.kl_mean == pytest.approx(0, abs=1e-6) and same.kl_p99 == pytest.approx(0, abs=1e-6)
    assert same.top1_agreement == 1 and same.perplexity_ratio == pytest.approx(1)
    alone = lowbit.evaluate(model, CharTokenizer(), [text], seqlen=24, progress=False)
    assert alone.perplexity == pytest.approx(same.perplexity)
    assert alone.kl_mean is None and alone.top1_agreement is None and alone.perplexity_ratio is None
