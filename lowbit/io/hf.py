"""transformers integration: `from_pretrained` on a lowbit checkpoint, or quantizing on load.

Registers a quantization config and an `HfQuantizer` under quant_method
"lowbit". `import lowbit` arranges for this module to be imported as soon as
transformers' quantizer registry is (see `lowbit.io.hf_hook`), so
`AutoModelForCausalLM.from_pretrained(checkpoint)` builds the same model as
`lowbit.load_quantized(checkpoint)`, and
`from_pretrained(full_precision, quantization_config=LowbitConfig(bits=3, group_size=64))`
loads the model and rounds its linear layers to nearest (`lowbit.quantize_rtn`).
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

from lowbit.errors import CheckpointError, UsageError
from lowbit.format import DTYPE_NAMES, check_bits, check_group_size_setting
from lowbit.io.checkpoint import (
    check_checkpoint,
    install_quant_linears,
    quant_modules,
    quantization_config,
    recorded_settings,
)
from lowbit.io.validate import (
    LOAD_GUARD,
    QUANT_METHOD,
    check_finite,
    check_quantization_config,
    check_tensors,
    drop_load_guard,
    open_tensors,
)
from lowbit.nn.convert import quantize_rtn
from lowbit.nn.permuted import PermutedQuantLinear, check_permutation
from lowbit.quant.schemes import check_overrides

# The settings of a request to quantize on load, with their defaults (those of quantize_rtn).
ON_LOAD_SETTINGS = {"bits": 3, "group_size": 64, "method": "rtn", "overrides": None, "skip": ["lm_head"],
                    "scale_dtype": None}


class LowbitConfig(QuantizationConfigMixin):
    """The `quantization_config` of a lowbit checkpoint (fields: docs/CHECKPOINTS.md), or, without
    `format_version`, a request to quantize a full-precision model while `from_pretrained` loads
    it: `LowbitConfig(bits=3, group_size=64, method="rtn", overrides=None, skip=["lm_head"],
    scale_dtype=None)`, the settings of `lowbit.quantize_rtn`."""

    def __init__(self, **fields: Any):
        fields.setdefault("quant_method", QUANT_METHOD)
        if "format_version" in fields or "modules" in fields:  # a saved checkpoint's, however damaged
            self.__dict__.update(check_quantization_config(fields))
        else:
            self.__dict__.update(check_on_load_settings(fields))

    @property
    def is_checkpoint(self) -> bool:
        return hasattr(self, "format_version")


def check_on_load_settings(fields: dict[str, Any]) -> dict[str, Any]:
    """A request to quantize on load, checked: only round-to-nearest needs no data."""
    unknown = set(fields) - set(ON_LOAD_SETTINGS) - {"quant_method"}
    if unknown:
        raise UsageError(f"lowbit: LowbitConfig takes {sorted(ON_LOAD_SETTINGS)} to quantize on load; "
                         f"unknown: {sorted(unknown)}")
    settings = {**ON_LOAD_SETTINGS, **fields}
    if settings["method"] != "rtn":
        raise UsageError(
            f"lowbit: from_pretrained quantizes by round-to-nearest only (method='rtn'); {settings['method']!r} "
            f"calibrates on data: run `lowbit quantize --method {settings['method']}` (or lowbit.quantize) "
            "and load the checkpoint it saves"
        )
    check_bits(settings["bits"])
    check_group_size_setting(settings["group_size"])
    settings["overrides"] = [[p, s] for p, s in check_overrides(settings["overrides"]).items()]
    skip = settings["skip"]
    if isinstance(skip, str) or not all(isinstance(pattern, str) for pattern in skip):
        raise UsageError(f"lowbit: skip must be a list of module name patterns, got {skip!r}")
    settings["skip"] = list(skip)
    if settings["scale_dtype"] is not None and settings["scale_dtype"] not in DTYPE_NAMES:
        raise UsageError(f"lowbit: scale_dtype must be one of {list(DTYPE_NAMES)} or None, "
                         f"got {settings['scale_dtype']!r}")
    return settings


class LowbitHfQuantizer(HfQuantizer):
    """Loads lowbit checkpoints with the validation of `load_quantized` (lowbit.io.validate):
    what it loads is what that loads. Given a full-precision model and a request
    (`LowbitConfig` without format_version), it loads the model and rounds it to nearest."""

    def __init__(self, quantization_config: LowbitConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if self.pre_quantized and not quantization_config.is_checkpoint:  # config.json's: refused, naming the fault
            check_quantization_config(quantization_config.to_dict(), "config.json quantization_config")
        if not self.pre_quantized and quantization_config.is_checkpoint:
            raise UsageError(
                "lowbit: this LowbitConfig describes a saved checkpoint; to quantize a full-precision model on "
                "load, give the settings only, e.g. LowbitConfig(bits=3, group_size=64)"
            )

    def update_attn_implementation(self, config):
        """Called before the model is built: a local checkpoint directory gets `load_quantized`'s
        checks here (config, files, sizes, the tensors' headers against the model built on the
        meta device), so that transformers builds only what lowbit would."""
        drop_load_guard(config)
        directory = Path(str(getattr(config, "_name_or_path", "") or ""))
        if self.pre_quantized and directory.is_dir():
            check_checkpoint(directory)
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return
        install_quant_linears(model, self.quantization_config.modules)
        directory = _directory_of(checkpoint_files)
        reader = open_tensors(directory)
        check_tensors(model, reader, str(directory))
        self.stored_tensors, self.directory = reader.keys(), directory

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            return self._quantize(model)
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

    def _quantize(self, model):
        """Rounds the loaded model to nearest; its config then describes the result, as a
        checkpoint's would, so that save_pretrained writes a lowbit checkpoint."""
        request = self.quantization_config
        scale_dtype = DTYPE_NAMES.get(request.scale_dtype)
        quantize_rtn(model, request.bits, request.group_size, request.skip, scale_dtype, request.overrides)
        self.quantization_config = LowbitConfig(**quantization_config(model))
        model.config.quantization_config = self.quantization_config
        model.config.attn_implementation = LOAD_GUARD
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
