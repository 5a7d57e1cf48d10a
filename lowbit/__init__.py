"""lowbit: 2- and 3-bit weight quantization for PyTorch language models."""

from lowbit import ops
from lowbit.convert import ConversionReport, quantize_rtn
from lowbit.nn import QuantLinear

__version__ = "0.1.0"

__all__ = ["ConversionReport", "QuantLinear", "ops", "quantize_rtn"]
