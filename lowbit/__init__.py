"""lowbit: 2- and 3-bit weight quantization for PyTorch language models.

The package is layered; each layer imports only from those before it:

    lowbit.format, lowbit.errors   the format's rules and the error types (no compiled code)
    lowbit.kernels                 the ops, their pure-torch reference, the kernel choice
    lowbit.quant                   the quantization grid and per-layer schemes
    lowbit.nn                      QuantLinear and whole-model conversions
    lowbit.io                      checkpoints, GPTQ, transformers, the default model and texts
    lowbit.calib                   QuantConfig, the block-wise engine and its methods
    lowbit.eval                    perplexity and speed
    lowbit.cli                     the `lowbit` command line

The names below are loaded on first use, so `import lowbit` is cheap and loads
neither the compiled kernels nor transformers until they are needed.
"""

from __future__ import annotations

import importlib

from lowbit import _moved
from lowbit._version import __version__
from lowbit.io import hf_hook

_API = {
    "BlockLog": "lowbit.calib.engine",
    "CalibrationReport": "lowbit.calib.engine",
    "quantize": "lowbit.calib.engine",
    "QuantConfig": "lowbit.calib.config",
    "compute_saliency": "lowbit.calib.saliency",
    "sliced_wasserstein": "lowbit.calib.losses",
    "ConversionReport": "lowbit.nn.convert",
    "dense_weights": "lowbit.nn.convert",
    "merge_adapters": "lowbit.nn.convert",
    "quantize_rtn": "lowbit.nn.convert",
    "QuantLinear": "lowbit.nn.quant_linear",
    "PermutedQuantLinear": "lowbit.nn.permuted",
    "peft_config": "lowbit.nn.lora",
    "resolve_scheme": "lowbit.quant.schemes",
    "perplexity": "lowbit.eval.perplexity",
    "evaluate": "lowbit.eval.perplexity",
    "Evaluation": "lowbit.eval.perplexity",
    "save_quantized": "lowbit.io.checkpoint",
    "load_quantized": "lowbit.io.checkpoint",
    "load_tokenizer": "lowbit.io.checkpoint",
    "checkpoint_info": "lowbit.io.info",
    "LowbitConfig": "lowbit.io.hf",
    "export_gptq": "lowbit.io.gptq",
    "load_gptq": "lowbit.io.gptq",
    "CheckpointError": "lowbit.errors",
    "LowbitError": "lowbit.errors",
}
# Subpackages reachable as attributes: lowbit.ops is the kernel namespace.
_NAMESPACES = {"ops": "lowbit.kernels", "assets": "lowbit.io.assets"}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name in _NAMESPACES:
        return importlib.import_module(_NAMESPACES[name])
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API, *_NAMESPACES})


hf_hook.install()
_moved.install()

__all__ = sorted([*_API, "ops", "assets", "__version__"])
