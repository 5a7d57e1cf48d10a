"""The tests' tiny models: randomly initialised causal LMs (Llama, OPT, Qwen2) built from
configs, a Hugging Face model directory with a tokenizer trained here, token helpers and a
stand-in tokenizer. Everything is offline and takes milliseconds.

`tiny_model` is the one factory; `tiny_llama` and `tiny_opt` are its checkpoint-test
shapes (vocabulary 320, wider MLPs); `tiny_hf_directory` saves one with a tokenizer for
the command line (the `tiny_hf` fixture of conftest.py).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

VOCAB = 128
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there one all we their river city north old new").split()


def tiny_model(family: str = "llama", layers: int = 2, attn: str = "sdpa", seed: int | None = 0, **config):
    """A small model of `family` whose linear layers have in_features 64 or 128, in eval mode.

    `seed` None draws the weights from the global generator (conftest.py seeds it per
    test); `config` overrides the defaults (vocab_size, intermediate_size, ...)."""
    from transformers import (
        LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    )

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4)
    if family == "llama":
        config_cls, cls, defaults = LlamaConfig, LlamaForCausalLM, dict(intermediate_size=128, num_key_value_heads=2)
    elif family == "opt":
        config_cls, cls = OPTConfig, OPTForCausalLM
        defaults = dict(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256)
    elif family == "qwen2":
        config_cls, cls, defaults = Qwen2Config, Qwen2ForCausalLM, dict(intermediate_size=128, num_key_value_heads=2)
    else:
        raise ValueError(family)
    model_config = config_cls(**{**common, **defaults, **config})
    model_config._attn_implementation = attn
    if seed is None:
        return cls(model_config).eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(model_config)
    return model.eval()


def tiny_llama(tie_word_embeddings: bool = True, layers: int = 2):
    """The checkpoint tests' Llama: vocabulary 320, MLP width 192, fresh weights each test."""
    return tiny_model("llama", layers, seed=None, vocab_size=320, intermediate_size=192,
                      max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings)


def tiny_opt():
    """OPT: linear layers with biases, learned positions (vocabulary 320, fresh weights)."""
    return tiny_model("opt", seed=None, vocab_size=320, max_position_embeddings=64)


def tiny_text(seed: int = 0, paragraphs: int = 150) -> str:
    """Paragraphs of words from a small vocabulary, ending in full stops."""
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) + "."
                       for _ in range(paragraphs))


def tiny_hf_directory(root: Path) -> dict[str, str | Path]:
    """Saves a 2-block random Llama with a byte-level BPE tokenizer (trained here) under
    root/model, and its training text as root/text.txt. Returns {"model": the model
    directory, "text": the text file, "root": root}."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = tiny_text()
    (root / "text.txt").write_text(text)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"],
        show_progress=False))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    model = tiny_model("llama", vocab_size=320, intermediate_size=192, max_position_embeddings=256,
                       eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return {"model": str(root / "model"), "text": str(root / "text.txt"), "root": root}


def random_tokens(n: int = 8, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def token_batch(model, batch: int = 2, length: int = 11) -> torch.Tensor:
    """Random token ids for `model` from the global generator."""
    return torch.randint(0, model.config.vocab_size, (batch, length))


@torch.no_grad()
def logits(model, tokens):
    return model(tokens).logits


class CharTokenizer:
    """A stand-in tokenizer: one token per character (code point modulo VOCAB)."""

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [ord(c) % VOCAB for c in text]
        if add_special_tokens:
            ids = [1] + ids  # a BOS that lowbit must not ask for

        class Encoding:
            input_ids = torch.tensor([ids])

        return Encoding()
