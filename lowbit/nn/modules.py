"""Finding a model's linear layers and swapping modules: the helpers that every
conversion (quantization, loading, dense evaluation) shares."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lowbit.format import BLOCK, resolve_group_size


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The [out_features, in_features] weight of an nn.Linear or a Conv1D."""
    return module.weight.T if is_conv1d(module) else module.weight


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear (and Conv1D) of a model, by qualified name, in module order."""
    return {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)
    }


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def incompatibility(module: nn.Module, group_size: int | None) -> str | None:
    """Why a layer cannot be quantized at this group size, or None if it can."""
    k = linear_weight(module).shape[1]
    if k % BLOCK:
        return f"in_features={k} is not a multiple of {BLOCK}"
    g = resolve_group_size(group_size, k)
    if g % BLOCK or k % g:
        return f"group_size={g} does not divide in_features={k} in multiples of {BLOCK}"
    return None


def warn_incompatible(reasons: dict[str, str], stacklevel: int) -> None:
    """One warning per reason for the layers left in full precision because the format
    cannot hold them (name -> `incompatibility`), naming the first two of each: a model
    whose 576-wide layers a group size does not fit would otherwise warn once per layer."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        if len(names) == 1:
            what = names[0]
        else:
            more = f" and {len(names) - 2} more" if len(names) > 2 else ""
            what = f"{len(names)} layers ({', '.join(names[:2])}{more})"
        warnings.warn(f"lowbit: not quantizing {what}: {reason}", stacklevel=stacklevel + 1)
