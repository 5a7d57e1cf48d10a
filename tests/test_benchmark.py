"""lowbit.benchmark's whole-model measurements on a tiny random model."""

import time

import torch
import transformers

from lowbit import benchmark


def tiny_model():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_decode_rate_counts_the_time_between_new_tokens():
    model = tiny_model()
    delay = 0.02
    # Every forward pass (the prefill, then one per new token) sleeps `delay`: the rate
    # cannot exceed 1 / delay, whatever the machine, and must stay positive and finite.
    model.model.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    ids = torch.randint(0, 128, (1, 5))
    rate = benchmark.decode_tokens_per_second(model, ids, new_tokens=6, repeats=2)
    assert 0 < rate <= 1 / delay


def test_model_speed_times_the_given_layers():
    model = tiny_model()
    layers = [model.model.layers[0].mlp.up_proj, model.model.layers[1].self_attn.q_proj]
    speed = benchmark.model_speed(model, layers, torch.randint(0, 128, (1, 4)), new_tokens=4, seconds=0.05)
    assert speed.linear_layers == 2
    assert 0 < speed.linear_seconds < 1 and 0 < speed.decode_tokens_per_s < float("inf")
