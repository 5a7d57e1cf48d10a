"""Round-to-nearest: min-max ranges per group, no data, no training (the floor)."""

from __future__ import annotations

from torch import nn

from dataclasses import dataclass

from lowbit.calib.methods.base import LayerSpec, Method
from lowbit.nn import QuantLinear


@dataclass
class RTNSettings:
    """Round-to-nearest has no settings of its own."""


class RTN(Method):
    """Asymmetric min-max round-to-nearest per group (`lowbit.quant.grid.rtn`), the same
    as `lowbit.quantize_rtn`. Needs no calibration data; defaults: nsamples=0, epochs=0."""

    name = "rtn"
    needs_data = False
    Settings = RTNSettings

    @classmethod
    def defaults(cls, config):
        return {"nsamples": 0, "seqlen": 0, "epochs": 0, "aug_loss": False, "lr": {}, "weight_decay": {}}

    def wrap(self, layer: nn.Module, spec: LayerSpec) -> nn.Module:
        return _Unchanged(layer, spec)

    def export(self, local_name: str, wrapper: nn.Module) -> nn.Module:
        spec = wrapper.spec
        return QuantLinear.from_linear(wrapper.linear, spec.bits, spec.group_size, spec.scale_dtype)


class _Unchanged(nn.Module):
    """The original layer, untouched (round-to-nearest learns nothing)."""

    def __init__(self, linear: nn.Module, spec: LayerSpec):
        super().__init__()
        self.linear, self.spec = linear, spec

    def forward(self, x):
        return self.linear(x)
