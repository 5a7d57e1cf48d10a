"""lowbit.eval.speed's whole-model measurements on a tiny random model."""

import time

import torch
from tiny import tiny_model

from lowbit.eval import speed


def test_decode_rate_counts_the_time_between_new_tokens():
    model = tiny_model()
    delay = 0.02
    # Every forward pass (the prefill, then one per new token) sleeps `delay`: the rate
    # cannot exceed 1 / delay, whatever the machine, and must stay positive and finite.
    model.model.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    ids = torch.randint(0, 128, (1, 5))
    rate = speed.decode_tokens_per_second(model, ids, new_tokens=6, repeats=2)
    assert 0 < rate <= 1 / delay


def test_model_speed_times_the_given_layers():
    model = tiny_model()
    layers = [model.model.layers[0].mlp.up_proj, model.model.layers[1].self_attn.q_proj]
    measured = speed.model_speed(model, layers, torch.randint(0, 128, (1, 4)), new_tokens=4, seconds=0.05)
    assert measured.linear_layers == 2
    assert 0 < measured.linear_seconds < 1 and 0 < measured.decode_tokens_per_s < float("inf")
