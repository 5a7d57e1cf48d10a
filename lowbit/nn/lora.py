"""LoRA on `QuantLinear` for peft (QLoRA-style fine-tuning of a lowbit model).

peft adapts layer types it does not know through `LoraConfig._register_custom_module`
(peft's documented extension point, https://huggingface.co/docs/peft/developer_guides/custom_models);
`peft_config` registers `QuantLoraLinear` for `QuantLinear` (and `PermutedQuantLinear`) on a
config, so `get_peft_model` and `PeftModel.from_pretrained` wrap lowbit's layers:

    config = lowbit.peft_config(LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(lowbit_model, config)

The packed weights stay frozen (they are buffers); only the adapters train. Merging
(`merge_and_unload`) rounds W + scale * B A onto the layer's grid (`QuantLinear.requantize`),
which keeps a model of lowbit layers but loses the part of the change smaller than a
quantization step, as a warning says; keeping the adapter unmerged keeps all of it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from lowbit.errors import UsageError, UsageTypeError
from lowbit.nn.quant_linear import QuantLinear

# Above this share of the adapter's change lost to rounding, merging warns.
MERGE_LOSS_WARNING = 0.5


class QuantLoraLinear(LoraLinear):
    """peft's LoRA `Linear` around a `QuantLinear`: y = base(x) + scaling * B(A(dropout(x))).

    The forward pass, dropout, adapter switching and mixed-adapter batches are peft's; this
    class sizes the adapters from the layer and merges into its codes. Merging keeps the
    unmerged layer, so `unmerge` restores it exactly."""

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any):
        layer = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if config.lora_bias:
            raise UsageError("lowbit: lora_bias is not supported on QuantLinear layers; set lora_bias=False")
        if config.fan_in_fan_out:
            raise UsageError("lowbit: QuantLinear stores [out_features, in_features]; set fan_in_fan_out=False")
        if not isinstance(layer, QuantLinear):
            raise UsageTypeError(f"lowbit: QuantLoraLinear wraps a QuantLinear, got {type(layer).__name__}")
        super().__init__(base_layer, adapter_name, config, **kwargs)
        self._unmerged_layers: list[QuantLinear] = []

    def _get_in_out_features(self, module: torch.nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    @property
    def lora_variants(self):
        return {(): None}  # DoRA and the other variants read a dense base weight

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as exc:
            raise UsageError(f"lowbit: plain LoRA only on QuantLinear layers (no DoRA or other variants): {exc}") from exc

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Rounds the base weight plus each adapter's change onto the layer's grid."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            layer = self.get_base_layer()
            delta = self.get_delta_weight(name).float()
            target = layer.dense_weight() + delta
            if safe_merge and not torch.isfinite(target).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            merged = layer.requantize(target)
            warn_if_rounded_away(merged.dense_weight() - target, delta, layer.bits)
            self._unmerged_layers.append(layer)
            self.base_layer = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            self.merged_adapters.pop()
            self.base_layer = self._unmerged_layers.pop()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()) * self.scaling[adapter]

    def __repr__(self) -> str:
        return "lowbit." + super().__repr__()


def warn_if_rounded_away(error: torch.Tensor, delta: torch.Tensor, bits: int) -> None:
    """Warns (once per message) when rounding lost most of an adapter's change."""
    change = delta.norm()
    if change > 0 and error.norm() / change > MERGE_LOSS_WARNING:
        warnings.warn(
            f"lowbit: merging a LoRA adapter into {bits}-bit codes rounds away most of its change (a "
            "fine-tuned change is usually smaller than a quantization step); to keep all of it, keep the "
            "adapter unmerged: save it with save_pretrained and load it with PeftModel.from_pretrained",
            stacklevel=3,
        )


def peft_config(config: LoraConfig) -> LoraConfig:
    """Registers lowbit's LoRA layer for `QuantLinear` on a peft `LoraConfig` and returns it,
    for `get_peft_model(model, config)` and `PeftModel.from_pretrained(model, path, config=config)`."""
    if not isinstance(config, LoraConfig):
        raise UsageTypeError(f"lowbit: peft_config takes a peft LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    return config
