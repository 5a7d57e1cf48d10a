"""A tiny random Llama and token windows for the apiq, tesseraq and saliency tests."""

import torch

VOCAB = 128


def tiny_llama(layers: int = 2, seed: int = 0):
    """Linear layers with in_features 64 or 128 (groups of 32 fit)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def random_tokens(n: int = 8, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))
