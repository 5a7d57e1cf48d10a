"""Tiny randomly initialised causal LMs (Llama, OPT, Qwen2) for the calibration tests."""

import pytest
import torch

VOCAB = 128


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(family: str = "llama", layers: int = 2, attn: str = "sdpa", seed: int = 0):
    """A small model of `family` whose linear layers have in_features 64 or 128."""
    from transformers import (
        LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    )

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4)
    if family == "llama":
        config = LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
        cls = LlamaForCausalLM
    elif family == "opt":
        config = OPTConfig(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256, **common)
        cls = OPTForCausalLM
    elif family == "qwen2":
        config = Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)
        cls = Qwen2ForCausalLM
    else:
        raise ValueError(family)
    config._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()


def random_tokens(n: int = 8, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


class CharTokenizer:
    """A stand-in tokenizer: one token per character (code point modulo VOCAB)."""

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [ord(c) % VOCAB for c in text]
        if add_special_tokens:
            ids = [1] + ids  # a BOS that lowbit must not ask for

        class Encoding:
            input_ids = torch.tensor([ids])

        return Encoding()
