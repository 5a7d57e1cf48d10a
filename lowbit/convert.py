"""Finding the linear layers of a model and swapping them for `QuantLinear`."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit import ops
from lowbit.nn import QuantLinear, is_conv1d, linear_weight
from lowbit.overrides import (
    Overrides,
    check_overrides,
    matching_override,
    resolve_scheme,
)
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


@dataclass
class MethodSettings:
    """What produced a quantized model: the method's name and settings, recorded as
    `model.lowbit_config` and written into checkpoints (`to_dict`)."""

    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.settings}


def quantize_rtn(
    model: nn.Module,
    bits: int,
    group_size: int | None = 64,
    skip: Iterable[str] = ("lm_head",),
    scale_dtype: torch.dtype | None = None,
    overrides: Overrides | None = None,
) -> ConversionReport:
    """Replaces every linear layer in place by a round-to-nearest `QuantLinear`.

    `overrides` (pattern -> {"bits", "group_size"} or None to skip) and `skip`
    choose each layer's settings as `lowbit.overrides.resolve_scheme` describes.
    Layers left out, or whose shape the format cannot hold, stay in full
    precision and are listed in the report; the incompatible ones also raise a
    warning. The settings are recorded as `model.lowbit_config`.
    """
    ops.check_bits(bits)
    skip = tuple(skip)
    overrides = check_overrides(overrides)
    report = ConversionReport()
    for name, module in linear_layers(model).items():
        scheme = resolve_scheme(name, bits, group_size, overrides, skip)
        if scheme is None:
            overridden = matching_override(name, overrides) is not None
            report.skipped[name] = "an override skips it" if overridden else "matches a skip pattern"
            continue
        reason = incompatibility(module, scheme.group_size)
        if reason:
            report.skipped[name] = reason
            warnings.warn(f"lowbit: not quantizing {name}: {reason}", stacklevel=2)
            continue
        try:
            with torch.no_grad():
                quantized = QuantLinear.from_linear(module, scheme.bits, scheme.group_size, scale_dtype)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        set_submodule(model, name, quantized)
        report.quantized.append(name)
    model.lowbit_config = MethodSettings(
        "rtn",
        {
            "bits": bits,
            "group_size": group_size,
            "overrides": overrides,
            "skip": list(skip),
            "scale_dtype": None if scale_dtype is None else str(scale_dtype).removeprefix("torch."),
        },
    )
    return report


def merge_adapters(model: nn.Module, grid: str = "same") -> list[str]:
    """Folds every QuantLinear's low-rank adapter into its codes, in place, by
    `QuantLinear.merge_and_requantize(grid)`: a pure low-bit model (as GPTQ export needs),
    at the cost of rounding what the adapters learned. Returns the merged layers' names."""
    adapted = [name for name, m in model.named_modules() if isinstance(m, QuantLinear) and m.adapter is not None]
    for name in adapted:
        set_submodule(model, name, model.get_submodule(name).merge_and_requantize(grid))
    return adapted
