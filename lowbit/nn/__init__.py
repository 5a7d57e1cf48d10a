"""The module layer: `QuantLinear` (a drop-in `torch.nn.Linear` with 2/3/4-bit weights),
its low-rank adapter, `PermutedQuantLinear`, and whole-model conversions."""

from lowbit.nn.convert import ConversionReport, dense_weights, merge_adapters, quantize_rtn
from lowbit.nn.modules import is_conv1d, linear_layers, linear_weight
from lowbit.nn.permuted import PermutedQuantLinear
from lowbit.nn.quant_linear import LowRankAdapter, QuantLinear

__all__ = [
    "ConversionReport",
    "LowRankAdapter",
    "PermutedQuantLinear",
    "QuantLinear",
    "dense_weights",
    "is_conv1d",
    "linear_layers",
    "linear_weight",
    "merge_adapters",
    "quantize_rtn",
]
