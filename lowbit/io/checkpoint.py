"""lowbit checkpoints: `save_quantized` and `load_quantized` (format: docs/CHECKPOINTS.md).

A checkpoint is a Hugging Face model directory: `config.json` with a
`quantization_config` (quant_method "lowbit") that lists every quantized
module, safetensors weights (sharded above a size limit, with the standard
index), and the tokenizer and generation config beside them.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from tqdm.auto import tqdm

from lowbit._version import __version__
from lowbit.errors import CheckpointError, UsageError, UsageTypeError
from lowbit.io.files import (
    DEFAULT_MAX_SHARD_SIZE,
    SafetensorsCheckpoint,
    atomic_directory,
    read_json_file,
    unique_tensors,
    write_safetensors,
)
from lowbit.io.validate import (  # noqa: F401  (the schema's names, also read from here)
    DTYPES,
    FORMAT_VERSION,
    LOAD_GUARD,
    QUANT_METHOD,
    READABLE_VERSIONS,
    check_directory,
    check_finite,
    check_quantization_config,
    check_tensor_header,
    check_tensor_names,
    check_tensors,
    describe,
    open_checkpoint,
    read_model_config,
    refuse_custom_code,
)
from lowbit.nn import PermutedQuantLinear, QuantLinear
from lowbit.nn.modules import linear_layers, linear_weight, set_submodule
from lowbit.quant.schemes import MethodSettings, check_overrides

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# --- the quantization config ---------------------------------------------------------


def module_spec(module: QuantLinear) -> dict[str, Any]:
    """The table entry of one quantized module: everything needed to rebuild it empty."""
    spec = {
        "bits": module.bits,
        "group_size": module.group_size,
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
        "dtype": str(module.scales.dtype).removeprefix("torch."),
    }
    if isinstance(module, PermutedQuantLinear):
        spec["input_perm"] = True
    if module.adapter is not None:
        spec["adapter"] = {
            "rank": module.adapter.rank,
            "dtype": str(module.adapter.A.dtype).removeprefix("torch."),
        }
    return spec


def quant_linear_from_spec(spec: Mapping[str, Any], device: torch.device | str = "meta") -> QuantLinear:
    """An empty module of the entry's kind, with an empty adapter of the recorded rank and
    dtype when the entry has one (its A, B and scale come with the checkpoint's tensors)."""
    cls = PermutedQuantLinear if spec.get("input_perm") else QuantLinear
    module = cls(
        spec["in_features"],
        spec["out_features"],
        spec["bits"],
        spec["group_size"],
        bias=spec["bias"],
        dtype=DTYPES[spec["dtype"]],
        device=device,
    )
    adapter = spec.get("adapter")
    if adapter is not None:
        module.attach_adapter(adapter["rank"], dtype=DTYPES[adapter["dtype"]])
    return module


def quant_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _jsonable(value: Any) -> Any:
    """Settings as JSON values: dtypes and paths become strings, tuples lists."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The `quantization_config` describing a quantized model (docs/CHECKPOINTS.md).

    The method and its settings come from `model.lowbit_config` when present
    (recorded by the quantization method); the module table always comes from
    the model's `QuantLinear` layers themselves.
    """
    modules = {name: module_spec(m) for name, m in quant_modules(model).items()}
    if not modules:
        raise UsageError(
            "lowbit: the model has no QuantLinear layers; quantize it first "
            "(lowbit.quantize_rtn or a calibration method)"
        )
    recorded = getattr(model, "lowbit_config", None)
    settings = _jsonable(recorded.to_dict()) if recorded is not None else {}
    overrides = check_overrides(settings.pop("overrides", None))
    common_bits, common_group = Counter((s["bits"], s["group_size"]) for s in modules.values()).most_common(
        1
    )[0][0]
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": settings.get("bits", common_bits),
        "group_size": settings.get("group_size", common_group),
        "modules": modules,
        # pairs, not an object: the first matching pattern wins, and JSON writers sort keys
        "overrides": [[pattern, setting] for pattern, setting in overrides.items()],
        "modules_to_not_convert": list(linear_layers(model)),
        "method": settings.get("method"),
        "method_config": settings,
        "lowbit_version": __version__,
    }


def recorded_settings(qc: Mapping[str, Any]) -> MethodSettings:
    """The method settings stored in a checkpoint, as `model.lowbit_config` (round-trips on re-save)."""
    settings = {k: v for k, v in (qc.get("method_config") or {}).items() if k != "method"}
    settings["overrides"] = qc.get("overrides") or []
    return MethodSettings(qc.get("method") or "unknown", settings)


# --- writing -------------------------------------------------------------------------


def _untie_quantized(model: nn.Module, config: transformers.PretrainedConfig) -> None:
    """A tie whose member was quantized (e.g. lm_head) no longer holds: record that in the config."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    state = model.state_dict()
    if any(k not in state or v not in state for k, v in tied.items()):
        for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
            cfg.tie_word_embeddings = False


def save_config_files(model: nn.Module, directory: Path, quant_config: dict, tokenizer=None) -> None:
    """config.json with `quant_config`, the generation config and the tokenizer files."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # what vLLM and others dispatch on
    config.quantization_config = quant_config
    if quant_config["quant_method"] == QUANT_METHOD:
        config.attn_implementation = LOAD_GUARD  # written to config.json: see LOAD_GUARD
    _untie_quantized(model, config)
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def check_saveable(model: nn.Module) -> None:
    if not isinstance(model, transformers.PreTrainedModel):
        raise UsageTypeError(
            f"lowbit: save_quantized needs a transformers PreTrainedModel (it writes its config), "
            f"got {type(model).__name__}"
        )


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Saves a quantized transformers model as a lowbit checkpoint directory.

    Every tensor of the model's state dict is written (each QuantLinear's whole
    state: packed codes, scales, zeros, bias and anything it holds besides), in
    safetensors shards of at most `max_shard_size` (bytes or a string like
    "2GB"). The directory appears complete or not at all; an existing checkpoint
    at `path` is replaced only once the new one is written.
    """
    check_saveable(model)
    quant_config = quantization_config(model)
    with atomic_directory(path) as tmp:
        write_checkpoint(model, quant_config, unique_tensors(model), tmp, tokenizer, max_shard_size)
    return Path(path)


def write_checkpoint(model: nn.Module, quant_config: dict, tensors: Mapping[str, torch.Tensor], directory: Path,
                     tokenizer=None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                     sizes: Mapping[str, int] | None = None) -> None:
    """The files of a checkpoint in `directory`: the weights, config.json and the tokenizer."""
    write_safetensors(tensors, directory, max_shard_size, sizes)
    save_config_files(model, directory, quant_config, tokenizer)


# --- reading -------------------------------------------------------------------------


def build_skeleton(config: transformers.PretrainedConfig, dtype: torch.dtype | None, meta: bool = False) -> nn.Module:
    """The model of a config without memory for its weights. `meta`: everything on the meta
    device (nothing allocated, for checking shapes); otherwise the buffers are real (a
    parameter is allocated, uninitialised, only while it is moved to the meta device, so
    build this only once the shapes are checked against the checkpoint)."""
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype) or getattr(torch, dtype)
    context = torch.device("meta") if meta else init_empty_weights(include_buffers=False)
    try:
        with context:
            return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except Exception as exc:  # a model class refusing the config's values: the checkpoint's fault
        raise CheckpointError(
            f"lowbit: cannot build a {getattr(config, 'model_type', '?')} model from its config.json: {exc}"
        ) from exc


def meta_model(config: transformers.PretrainedConfig, dtype: torch.dtype | None,
               modules: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """The model the checkpoint describes, quantized modules included, on the meta device."""
    model = build_skeleton(config, dtype, meta=True)
    install_quant_linears(model, modules)
    return model


def install_quant_linears(model: nn.Module, modules: Mapping[str, Mapping[str, Any]], device="meta") -> None:
    """Replaces each linear layer named in the table by an empty QuantLinear of its spec."""
    linears = linear_layers(model)
    for name, spec in modules.items():
        linear = linears.get(name)
        if linear is None:
            raise CheckpointError(
                f"lowbit: quantization_config.modules names {name!r}, which is not a linear layer of "
                f"{type(model).__name__}"
            )
        out_features, in_features = linear_weight(linear).shape
        if (in_features, out_features) != (spec["in_features"], spec["out_features"]):
            raise CheckpointError(
                f"lowbit: quantization_config.modules[{name!r}] says in_features={spec['in_features']}, "
                f"out_features={spec['out_features']}, but the model's layer has {in_features} inputs "
                f"and {out_features} outputs"
            )
        if (linear.bias is not None) != spec["bias"]:
            raise CheckpointError(
                f"lowbit: quantization_config.modules[{name!r}] says bias={spec['bias']}, "
                f"but the model's layer {'has' if linear.bias is not None else 'has no'} bias"
            )
        set_submodule(model, name, quant_linear_from_spec(spec, device))


def assign_tensors(
    model: nn.Module, tensors: Mapping[str, torch.Tensor] | SafetensorsCheckpoint, source: str
) -> None:
    """Loads every tensor into the skeleton (checking names, shapes, dtypes and that floats
    are finite), casting full-precision floats to the model's dtype, then ties weights."""
    check_tensor_names(model, list(tensors.keys()), source)
    expected = model.state_dict()
    state = {}
    for key in tqdm(
        list(tensors.keys()), desc="lowbit: loading tensors", leave=False, disable=len(expected) < 512
    ):
        t = tensors[key]
        check_tensor_header(key, t.dtype, tuple(t.shape), expected[key], model, source)
        check_finite(key, t, source)
        state[key] = t.to(expected[key].dtype)
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except ValueError as exc:  # a module's own checks (e.g. a permutation that is not one)
        raise CheckpointError(f"lowbit: {source}: {exc}") from exc
    if getattr(model, "all_tied_weights_keys", None):
        model.tie_weights()
    still_empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_empty:
        raise CheckpointError(f"lowbit: {source} lacks tensor {still_empty[0]}")


def tokenizer_files(path: Path) -> list[str]:
    """The tokenizer files present in a model directory."""
    return [f for f in _TOKENIZER_FILES if (path / f).exists()]


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside a checkpoint, or None if there is none. Its files must lie
    inside the directory; code of its own (auto_map) is refused, never run."""
    path = Path(path)
    if not tokenizer_files(path):
        return None
    check_directory(path)
    if os.path.lexists(path / "tokenizer_config.json"):
        refuse_custom_code(read_json_file(path, "tokenizer_config.json"), path / "tokenizer_config.json")
    try:
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # the tokenizers library raises plain Exceptions for corrupt files
        raise CheckpointError(f"lowbit: cannot load the tokenizer saved in {path}: {exc}") from exc


def check_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[transformers.PretrainedConfig, dict[str, Any], SafetensorsCheckpoint]:
    """(config, quantization_config, tensors) of a lowbit checkpoint, with everything checked
    that can be without reading tensor data (lowbit.io.validate)."""
    config, reader = open_checkpoint(path)
    qc = check_quantization_config(
        getattr(config, "quantization_config", None), f"{path}/config.json quantization_config"
    )
    check_tensors(meta_model(config, dtype, qc["modules"]), reader, str(path))
    return config, qc, reader


def load_quantized(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> transformers.PreTrainedModel:
    """Loads a lowbit checkpoint written by `save_quantized` (eval mode, on `device`).

    The model is built without allocating its full-precision weights, its
    quantized layers are created from the config's module table, and every
    tensor is checked (names, shapes, dtypes, finite scales) as it is loaded.
    `dtype` is that of the full-precision rest (default: the config's); the
    quantized layers keep their stored scale dtype. The tokenizer, if saved
    beside the weights, comes from `lowbit.load_tokenizer(path)`.
    """
    config, qc, reader = check_checkpoint(path, dtype)
    model = build_skeleton(config, dtype)
    install_quant_linears(model, qc["modules"])
    assign_tensors(model, reader, str(path))
    model.lowbit_config = recorded_settings(qc)
    return model.to(device).eval()


