"""A lean decoding loop for Llama-family causal LMs (batch 1): the same arithmetic as
transformers' forward pass, with far less Python per token.

transformers spends more time per decoded token in its per-layer Python (cache objects,
masks, kwargs plumbing) than a small quantized model spends in its kernels. `LeanDecoder`
runs the decoder blocks as a flat loop of tensor ops over a preallocated (static) KV
cache, with the q/k/v and gate/up projections fused into one quantized matmul each where
their settings allow (`QuantLinear.concat_rows`, exact). It reads the model's own
modules and weights, so it computes what the model computes; `lean_unsupported` says
why a model cannot take this path (the caller then uses transformers' `generate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import UsageError
from lowbit.nn.quant_linear import QuantLinear, concat_rows_mismatch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
# Rotary embeddings whose frequencies do not depend on the sequence length, so that one
# table computed up front holds every position's.
STATIC_ROPE_TYPES = ("default", "linear", "llama3")


def lean_unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot run on the lean path (one phrase), or None if it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"{model_type or type(model).__name__} models are not covered (only {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r} (only silu)"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    rope_type = getattr(getattr(model.model, "rotary_emb", None), "rope_type", None)
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rotary embedding {rope_type!r} (only {', '.join(STATIC_ROPE_TYPES)})"
    if any(p.device.type == "meta" for p in model.parameters()):
        return "weights on the meta device (offloaded)"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic: normalized in fp32 (one aten call), scaled in the input's dtype."""
    return weight * torch.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == x.roll(half, -1) * signed_sin(sin),
    where rotate_half(x) = cat(-x[half:], x[:half]); one roll instead of two slices, a
    negation and a concatenation per block."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class Projection:
    """Several linear layers applied to one input, their outputs concatenated: one fused
    QuantLinear when their rows can be stacked, else each layer as it is."""

    def __init__(self, layers: Sequence[nn.Module]):
        stackable = all(concat_rows_mismatch(layers[0], layer) is None for layer in layers)
        self.fused = len(layers) > 1 and stackable
        self.layers = [QuantLinear.concat_rows(list(layers))] if self.fused else list(layers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.layers) == 1:
            return self.layers[0](x)
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


@dataclass
class Block:
    attn_norm: torch.Tensor
    qkv: Projection
    o_proj: nn.Module
    mlp_norm: torch.Tensor
    gate_up: Projection
    down_proj: nn.Module


class LeanDecoder:
    """Decodes a supported model (see `lean_unsupported`) token by token, batch 1.

    `head` replaces the model's lm_head (e.g. a bfloat16 or quantized copy,
    `lowbit.nn.lm_head`); the model itself is not changed.
    """

    def __init__(self, model: nn.Module, head: nn.Module | None = None):
        reason = lean_unsupported(model)
        if reason:
            raise UsageError(f"lowbit: the lean decoding path does not support this model: {reason}")
        config, inner = model.config, model.model
        self.embed = inner.embed_tokens
        self.norm_weight, self.eps = inner.norm.weight, inner.norm.variance_epsilon
        self.rotary = inner.rotary_emb
        self.head = head if head is not None else model.lm_head
        attn = inner.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.q_heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.intermediate = config.intermediate_size
        self.blocks = [self._block(layer) for layer in inner.layers]
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.capacity = 0
        self.keys = self.values = self.cos = self.sin_signed = None
        self.block_caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def _block(layer: nn.Module) -> Block:
        attn, mlp = layer.self_attn, layer.mlp
        return Block(layer.input_layernorm.weight, Projection([attn.q_proj, attn.k_proj, attn.v_proj]),
                     attn.o_proj, layer.post_attention_layernorm.weight,
                     Projection([mlp.gate_proj, mlp.up_proj]), mlp.down_proj)

    @property
    def fused_projections(self) -> int:
        """How many q/k/v and gate/up groups run as one quantized matmul."""
        return sum(p.fused for b in self.blocks for p in (b.qkv, b.gate_up))

    def reserve(self, length: int) -> None:
        """Makes the KV cache (keeping what it holds) and the rotary tables hold `length`
        positions; `generate` reserves all it needs before the first token."""
        if length <= self.capacity:
            return
        shape = (len(self.blocks), 1, self.kv_heads, length, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.capacity:
            keys[:, :, :, :self.capacity] = self.keys
            values[:, :, :, :self.capacity] = self.values
        self.keys, self.values = keys, values
        self.block_caches = list(zip(keys.unbind(0), values.unbind(0)))  # views, one per block
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, positions)  # [1, length, head_dim], as the model computes them
        self.cos, self.sin_signed = cos[:, None], signed_sin(sin[:, None])
        self.capacity = length

    def forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [1, vocab] after the tokens ids [1, n] at positions start..start+n-1, with the
        cache holding positions before `start`. A prompt of several tokens starts at 0."""
        n = ids.shape[1]
        if n > 1 and start != 0:
            raise UsageError("lowbit: the lean decoder takes several tokens only as a prompt at position 0")
        end = start + n
        self.reserve(end)
        cos, sin_signed = self.cos[:, :, start:end], self.sin_signed[:, :, start:end]
        qk_heads = self.q_heads + self.kv_heads
        x = self.embed(ids)
        for block, (keys, values) in zip(self.blocks, self.block_caches):
            h = rms_norm(x, block.attn_norm, self.eps)
            qkv = block.qkv(h).view(1, n, -1, self.head_dim).transpose(1, 2)
            qk = qkv[:, :qk_heads]
            qk = qk * cos + qk.roll(self.head_dim // 2, -1) * sin_signed
            keys[:, :, start:end] = qk[:, self.q_heads:]
            values[:, :, start:end] = qkv[:, qk_heads:]
            a = F.scaled_dot_product_attention(
                qk[:, :self.q_heads], keys[:, :, :end], values[:, :, :end],
                is_causal=n > 1, scale=self.scaling, enable_gqa=True)
            x = x + block.o_proj(a.transpose(1, 2).reshape(1, n, -1))
            h = rms_norm(x, block.mlp_norm, self.eps)
            gate, up = block.gate_up(h).split(self.intermediate, dim=-1)
            x = x + block.down_proj(F.silu(gate) * up)
        return self.head(rms_norm(x[:, -1], self.norm_weight, self.eps))

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int,
                 choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 eos_token_ids: Sequence[int] = (), streamer=None) -> torch.Tensor:
        """ids [1, n] followed by up to `max_new_tokens` new tokens, stopping after an EOS
        token. `choose(ids so far, fp32 logits [1, vocab])` picks each token ([1], greedy by
        default); `streamer` gets the prompt, then each token, as transformers' streamers do."""
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise UsageError(f"lowbit: the lean decoder takes one sequence of token ids [1, n], got {list(ids.shape)}")
        choose = choose or greedy
        ids = ids.to(self.device)
        self.reserve(ids.shape[1] + max_new_tokens)
        if streamer is not None:
            streamer.put(ids.cpu())
        logits = self.forward(ids, 0)
        for step in range(max_new_tokens):
            token = choose(ids, logits.float())
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
            if streamer is not None:
                streamer.put(token.cpu())
            if int(token) in eos_token_ids or step + 1 == max_new_tokens:
                break
            logits = self.forward(token.view(1, 1), ids.shape[1] - 1)
        if streamer is not None:
            streamer.end()
        return ids


def greedy(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)
