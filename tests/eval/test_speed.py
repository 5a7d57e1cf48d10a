"""lowbit.eval.speed's whole-model measurements on a tiny random model."""

import time

import pytest
import torch
from tiny import tiny_model

from lowbit.eval import speed
from lowbit.nn.decoding import Decoding


@pytest.mark.parametrize("path", ["lean", "transformers"])
def test_decode_rate_counts_the_time_between_new_tokens(path):
    model = tiny_model()
    delay = 0.02
    # Every forward pass (the prefill, then one per new token) looks up embeddings, which
    # sleeps `delay`: the rate cannot exceed 1 / delay, whatever the machine, and must stay
    # positive and finite.
    model.model.embed_tokens.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    ids = torch.randint(0, 128, (1, 5))
    rate = speed.decode_tokens_per_second(Decoding(model, path), ids, new_tokens=6, repeats=2)
    assert 0 < rate <= 1 / delay


def test_model_speed_times_the_given_layers():
    model = tiny_model()
    layers = [model.model.layers[0].mlp.up_proj, model.model.layers[1].self_attn.q_proj]
    measured = speed.model_speed(model, layers, torch.randint(0, 128, (1, 4)), new_tokens=4, seconds=0.05)
    assert measured.linear_layers == 2
    assert measured.decoding.startswith("lean path (0 fused projections, 4-bit g32 lm_head, 4+4-bit for its top 64")
    assert 0 < measured.linear_seconds < 1 and 0 < measured.decode_tokens_per_s < float("inf")
