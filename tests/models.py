"""Tiny random transformers models for checkpoint tests (built from configs, no downloads)."""

import torch
import transformers


def tiny_llama(tie_word_embeddings=True, layers=2):
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def tiny_opt():
    """OPT: linear layers with biases, learned positions."""
    config = transformers.OPTConfig(
        vocab_size=320,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def token_batch(model, batch=2, length=11):
    return torch.randint(0, model.config.vocab_size, (batch, length))


@torch.no_grad()
def logits(model, tokens):
    return model(tokens).logits
