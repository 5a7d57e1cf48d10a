"""lowbit: 2- and 3-bit weight quantization for PyTorch language models."""

from lowbit import ops
from lowbit.calibrate import BlockLog, CalibrationReport, quantize
from lowbit.config import QuantConfig
from lowbit.convert import ConversionReport, quantize_rtn
from lowbit.evaluate import dense_weights, perplexity
from lowbit.losses import sliced_wasserstein
from lowbit.nn import QuantLinear
from lowbit.saliency import compute_saliency

__version__ = "0.1.0"

__all__ = [
    "BlockLog",
    "CalibrationReport",
    "ConversionReport",
    "QuantConfig",
    "QuantLinear",
    "compute_saliency",
    "dense_weights",
    "ops",
    "perplexity",
    "quantize",
    "quantize_rtn",
    "sliced_wasserstein",
]
