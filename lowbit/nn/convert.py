"""Whole-model conversions: every linear layer to a round-to-nearest `QuantLinear`,
adapters merged into the codes, and QuantLinears to dense stand-ins."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.format import check_bits
from lowbit.nn.modules import incompatibility, linear_layers, set_submodule, warn_incompatible
from lowbit.nn.quant_linear import QuantLinear
from lowbit.quant.schemes import MethodSettings, Overrides, check_overrides, matching_override, resolve_scheme


@dataclass
class ConversionReport:
    """What a conversion did: the layers it quantized and why it left the others."""

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"quantized {len(self.quantized)} linear layers, skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


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
    check_bits(bits)
    skip = tuple(skip)
    overrides = check_overrides(overrides)
    report = ConversionReport()
    incompatible: dict[str, str] = {}
    for name, module in linear_layers(model).items():
        scheme = resolve_scheme(name, bits, group_size, overrides, skip)
        if scheme is None:
            overridden = matching_override(name, overrides) is not None
            report.skipped[name] = "an override skips it" if overridden else "matches a skip pattern"
            continue
        reason = incompatibility(module, scheme.group_size)
        if reason:
            report.skipped[name] = incompatible[name] = reason
            continue
        try:
            with torch.no_grad():
                quantized = QuantLinear.from_linear(module, scheme.bits, scheme.group_size, scale_dtype)
        except ValueError as exc:
            raise type(exc)(f"{name}: {exc}") from exc
        set_submodule(model, name, quantized)
        report.quantized.append(name)
    warn_incompatible(incompatible, stacklevel=2)
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


def dense_linear(layer: QuantLinear) -> nn.Linear:
    """An nn.Linear computing exactly the weights of a QuantLinear (dequantized in fp32,
    its low-rank adapter folded in)."""
    weight = layer.dense_weight()
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      device=weight.device, dtype=torch.float32)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias.float())
    return dense.requires_grad_(False)


@contextlib.contextmanager
def dense_weights(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily replaces every QuantLinear in `module` by a dense fp32 nn.Linear with
    the same dequantized weights: the same model, computed by dense matmuls. For fast
    fake-quantized evaluation where no fast kernel is available; results match the
    packed kernels up to floating-point summation order."""
    quantized = {name: m for name, m in module.named_modules() if isinstance(m, QuantLinear) and name}
    try:
        for name, layer in quantized.items():
            set_submodule(module, name, _DtypeFollowing(dense_linear(layer)))
        yield module
    finally:
        for name, layer in quantized.items():
            set_submodule(module, name, layer)


class _DtypeFollowing(nn.Module):
    """Computes in fp32 and returns the input's dtype, like QuantLinear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.float()).to(x.dtype)
