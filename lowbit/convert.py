"""Finding the linear layers of a model and swapping them for `QuantLinear`."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit import ops
from lowbit.nn import QuantLinear, is_conv1d, linear_weight
from lowbit.quantizer import resolve_group_size


@dataclass
class ConversionReport:
    """What a conversion did: the layers it quantized and why it left the others."""

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"quantized {len(self.quantized)} linear layers, skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def name_matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern equal to it, to its last dotted components, or
    matching it as a full regular expression (`lm_head`, `mlp.down_proj`, `.*\\.0\\..*`)."""
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


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
    if k % ops.BLOCK:
        return f"in_features={k} is not a multiple of {ops.BLOCK}"
    g = resolve_group_size(group_size, k)
    if g % ops.BLOCK or k % g:
        return f"group_size={g} does not divide in_features={k} in multiples of {ops.BLOCK}"
    return None


def quantize_rtn(
    model: nn.Module,
    bits: int,
    group_size: int | None = 64,
    skip: Iterable[str] = ("lm_head",),
    scale_dtype: torch.dtype | None = None,
) -> ConversionReport:
    """Replaces every linear layer in place by a round-to-nearest `QuantLinear`.

    Layers whose names match a `skip` pattern (see `name_matches`) or whose shape
    the format cannot hold stay in full precision and are listed in the report;
    the incompatible ones also raise a warning.
    """
    ops.check_bits(bits)
    skip = tuple(skip)
    report = ConversionReport()
    for name, module in linear_layers(model).items():
        if any(name_matches(name, p) for p in skip):
            report.skipped[name] = "matches a skip pattern"
            continue
        reason = incompatibility(module, group_size)
        if reason:
            report.skipped[name] = reason
            warnings.warn(f"lowbit: not quantizing {name}: {reason}", stacklevel=2)
            continue
        try:
            with torch.no_grad():
                quantized = QuantLinear.from_linear(module, bits, group_size, scale_dtype)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        set_submodule(model, name, quantized)
        report.quantized.append(name)
    return report
