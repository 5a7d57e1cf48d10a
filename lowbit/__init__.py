"""lowbit: 2- and 3-bit weight quantization for PyTorch language models."""

from lowbit import _hf_hook, ops
from lowbit.calibrate import BlockLog, CalibrationReport, quantize
from lowbit.config import QuantConfig
from lowbit.convert import ConversionReport, merge_adapters, quantize_rtn
from lowbit.evaluate import dense_weights, perplexity
from lowbit.losses import sliced_wasserstein
from lowbit.nn import QuantLinear
from lowbit.overrides import resolve_scheme
from lowbit.permuted import PermutedQuantLinear
from lowbit.saliency import compute_saliency

__version__ = "0.1.0"

# Checkpoint functions import transformers (seconds): loaded on first use.
_LAZY = {
    "save_quantized": "lowbit.checkpoint",
    "load_quantized": "lowbit.checkpoint",
    "load_tokenizer": "lowbit.checkpoint",
    "checkpoint_info": "lowbit.checkpoint",
    "CheckpointError": "lowbit.checkpoint",
    "export_gptq": "lowbit.gptq",
    "load_gptq": "lowbit.gptq",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


_hf_hook.install()

__all__ = [
    "BlockLog",
    "CalibrationReport",
    "checkpoint_info",
    "CheckpointError",
    "ConversionReport",
    "compute_saliency",
    "dense_weights",
    "export_gptq",
    "load_gptq",
    "load_quantized",
    "load_tokenizer",
    "merge_adapters",
    "ops",
    "PermutedQuantLinear",
    "perplexity",
    "QuantConfig",
    "quantize",
    "quantize_rtn",
    "QuantLinear",
    "resolve_scheme",
    "save_quantized",
    "sliced_wasserstein",
]
