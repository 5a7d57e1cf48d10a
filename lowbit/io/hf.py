"""transformers integration: `from_pretrained` on a lowbit checkpoint.

Registers a quantization config and an `HfQuantizer` under quant_method
"lowbit". `import lowbit` arranges for this module to be imported as soon as
transformers' quantizer registry is (see `lowbit.io.hf_hook`), so
`AutoModelForCausalLM.from_pretrained(checkpoint)` builds the same model as
`lowbit.load_quantized(checkpoint)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from lowbit.errors import CheckpointError
from lowbit.io.checkpoint import check_checkpoint, install_quant_linears, quant_modules, recorded_settings
from lowbit.io.validate import (
    LOAD_GUARD,
    QUANT_METHOD,
    check_finite,
    check_quantization_config,
    check_tensors,
    drop_load_guard,
    open_tensors,
)
from lowbit.nn.permuted import PermutedQuantLinear, check_permutation


class LowbitConfig(QuantizationConfigMixin):
    """The `quantization_config` of a lowbit checkpoint (fields: docs/CHECKPOINTS.md)."""

    def __init__(self, **fields: Any):
        fields.setdefault("quant_method", QUANT_METHOD)
        self.__dict__.update(check_quantization_config(fields))


class LowbitHfQuantizer(HfQuantizer):
    """Loads pre-quantized lowbit checkpoints (it does not quantize on the fly), with the
    validation of `load_quantized` (lowbit.io.validate): what it loads is what that loads."""

    requires_calibration = True

    def update_attn_implementation(self, config):
        """Called before the model is built: a local directory gets `load_quantized`'s checks
        here (config, files, sizes, the tensors' headers against the model built on the meta
        device), so that transformers builds only what lowbit would."""
        drop_load_guard(config)
        directory = Path(str(getattr(config, "_name_or_path", "") or ""))
        if directory.is_dir():
            check_checkpoint(directory)
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        install_quant_linears(model, self.quantization_config.modules)
        directory = _directory_of(checkpoint_files)
        reader = open_tensors(directory)
        check_tensors(model, reader, str(directory))
        self.stored_tensors, self.directory = reader.keys(), directory

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, module in quant_modules(model).items():
            for tensor_name, t in [*module.named_buffers(), *module.named_parameters()]:  # adapter's too
                key = f"{name}.{tensor_name}"
                if t.is_meta or not getattr(t, "_is_hf_initialized", False):
                    raise CheckpointError(f"lowbit: the checkpoint lacks tensor {key}")
            if isinstance(module, PermutedQuantLinear):
                try:
                    check_permutation(module.input_perm, module.in_features, f"{name}.input_perm")
                except ValueError as exc:
                    raise CheckpointError(str(exc)) from exc
        state = model.state_dict()
        for key in self.stored_tensors:
            if not state[key].is_meta:  # (offloaded to disk by a device_map)
                check_finite(key, state[key], str(self.directory))
        model.lowbit_config = recorded_settings(self.quantization_config.to_dict())
        model.config.attn_implementation = LOAD_GUARD  # so that save_pretrained writes it
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters train on top of the frozen packed weights (peft: lowbit.nn.lora)."""
        return True


def _directory_of(checkpoint_files: list[str] | None) -> Path:
    """The one directory holding the weight files transformers resolved."""
    directories = {Path(os.path.realpath(Path(f).parent)) for f in checkpoint_files or ()}
    if len(directories) != 1:
        raise CheckpointError(
            f"lowbit: a lowbit checkpoint's weight files must lie in one directory, got {sorted(directories)}"
        )
    return directories.pop()


def register() -> None:
    """Registers lowbit with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowbitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)


register()
