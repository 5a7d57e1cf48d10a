"""lowbit.compute_saliency: the diagonal empirical Fisher of the linear weights of the blocks."""

import pytest
import torch
import torch.nn.functional as F
from tiny import CharTokenizer, random_tokens, tiny_model

import lowbit
from lowbit.calib import saliency as saliency_module
from lowbit.calib.blocks import decoder_blocks
from lowbit.calib.saliency import load_saliency
from lowbit.errors import CheckpointMismatchError
from lowbit.nn.modules import linear_layers


pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(model, tokens):
    """sum over windows of the squared gradient of each window's mean next-token loss,
    with plain autograd on the whole model."""
    _, blocks = decoder_blocks(model)
    layers = {(i, name): layer for i, b in enumerate(blocks) for name, layer in linear_layers(b).items()}
    sums = {key: torch.zeros_like(layer.weight, dtype=torch.float64) for key, layer in layers.items()}
    for window in tokens:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=window[None]).logits[0, :-1]
        F.cross_entropy(logits, window[1:]).backward()
        for key, layer in layers.items():
            sums[key] += layer.weight.grad.double() ** 2
    model.zero_grad(set_to_none=True)
    return sums


@pytest.mark.parametrize("blocks_per_pass", [None, 1, 2])
def test_saliency_equals_brute_force_squared_gradients(tmp_path, blocks_per_pass):
    model = tiny_model(layers=3)
    tokens = random_tokens(5, 24)
    out = lowbit.compute_saliency(model, tokens, out_dir=tmp_path / "s", blocks_per_pass=blocks_per_pass,
                                  progress=False)
    expected = brute_force(model, tokens)
    for i in range(3):
        got = load_saliency(out, i)
        assert set(got) == {name for (j, name) in expected if j == i} and len(got) == 7
        for name, s in got.items():
            assert s.dtype == torch.float32 and (s >= 0).all() and s.sum() > 0
            torch.testing.assert_close(s.double(), expected[(i, name)], rtol=1e-4, atol=1e-12)


def test_saliency_leaves_the_model_as_it_was(tmp_path):
    model = tiny_model()
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    lowbit.compute_saliency(model, random_tokens(2, 16), out_dir=tmp_path, progress=False)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_saliency_resumes_and_refuses_other_data(tmp_path, monkeypatch):
    model = tiny_model(layers=3)
    tokens = random_tokens(3, 16)
    lowbit.compute_saliency(model, tokens, out_dir=tmp_path, progress=False)
    first = {i: load_saliency(tmp_path, i) for i in range(3)}
    (tmp_path / "block_0001.safetensors").unlink()  # as if interrupted before block 1 was written
    covered = []
    real = saliency_module._accumulate
    monkeypatch.setattr(saliency_module, "_accumulate",
                        lambda m, b, group, *a: covered.append(list(group)) or real(m, b, group, *a))
    lowbit.compute_saliency(model, tokens, out_dir=tmp_path, progress=False)
    assert covered == [[1]]
    for name, s in load_saliency(tmp_path, 1).items():
        torch.testing.assert_close(s, first[1][name], rtol=1e-6, atol=0)
    lowbit.compute_saliency(model, tokens, out_dir=tmp_path, progress=False)
    assert covered == [[1]]  # nothing left to do
    with pytest.raises(CheckpointMismatchError, match="another model or other"):
        lowbit.compute_saliency(model, random_tokens(3, 16, seed=9), out_dir=tmp_path, progress=False)


def test_saliency_from_texts_and_clear_errors(tmp_path):
    model = tiny_model()
    texts = ["the quick brown fox jumps over the lazy dog " * 4] * 3
    out = lowbit.compute_saliency(model, texts, CharTokenizer(), tmp_path, nsamples=2, seqlen=16, progress=False)
    assert len(load_saliency(out, 0)) == 7
    with pytest.raises(ValueError, match="tokenizer"):
        lowbit.compute_saliency(model, texts, out_dir=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="token ids"):
        lowbit.compute_saliency(model, torch.full((2, 8), 999), out_dir=tmp_path / "y", progress=False)
    with pytest.raises(FileNotFoundError, match="compute_saliency"):
        load_saliency(tmp_path / "missing", 0)
