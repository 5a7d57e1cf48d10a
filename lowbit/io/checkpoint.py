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

from lowbit import format
from lowbit._version import __version__
from lowbit.errors import CheckpointError, UsageError, UsageTypeError
from lowbit.io.files import (
    DEFAULT_MAX_SHARD_SIZE,
    SafetensorsCheckpoint,
    atomic_directory,
    unique_tensors,
    write_safetensors,
)
from lowbit.nn import PermutedQuantLinear, QuantLinear
from lowbit.nn.modules import linear_layers, linear_weight, set_submodule
from lowbit.quant.schemes import MethodSettings, check_overrides

QUANT_METHOD = "lowbit"
FORMAT_VERSION = 2  # 2 added the "adapter" field of module entries
READABLE_VERSIONS = (1, 2)

_DTYPES = format.DTYPE_NAMES
_SPEC_KEYS = {"bits", "group_size", "in_features", "out_features", "bias", "dtype"}
# Optional module-entry fields, by the format version that introduced them.
_OPTIONAL_SPEC_KEYS = {1: {"input_perm"}, 2: {"input_perm", "adapter"}}
_ADAPTER_KEYS = {"rank", "dtype"}
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
        dtype=_DTYPES[spec["dtype"]],
        device=device,
    )
    adapter = spec.get("adapter")
    if adapter is not None:
        module.attach_adapter(adapter["rank"], dtype=_DTYPES[adapter["dtype"]])
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


def check_quantization_config(qc: Any, where: str = "quantization_config") -> dict[str, Any]:
    """Validates a lowbit `quantization_config` dict, raising CheckpointError naming the bad key."""
    if qc is None:
        raise CheckpointError(f"lowbit: {where} is missing: not a quantized checkpoint")
    if not isinstance(qc, Mapping):
        raise CheckpointError(f"lowbit: {where} must be a JSON object, got {type(qc).__name__}")
    if qc.get("quant_method") != QUANT_METHOD:
        hint = " (a GPTQ checkpoint: use lowbit.load_gptq)" if qc.get("quant_method") == "gptq" else ""
        raise CheckpointError(
            f"lowbit: {where}.quant_method is {qc.get('quant_method')!r}, not {QUANT_METHOD!r}{hint}"
        )
    version = qc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"lowbit: {where}.format_version is missing or not an integer: {version!r}")
    if version not in READABLE_VERSIONS:
        newer = " (written by a newer lowbit: upgrade lowbit)" if version > FORMAT_VERSION else ""
        raise CheckpointError(
            f"lowbit: {where}.format_version {version} is not supported; this lowbit reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}{newer}"
        )
    modules = qc.get("modules")
    if not isinstance(modules, Mapping) or not modules:
        raise CheckpointError(f"lowbit: {where}.modules must be a non-empty table of quantized modules")
    for name, spec in modules.items():
        _check_spec(spec, f"{where}.modules[{name!r}]", version)
    try:
        check_overrides(qc.get("overrides"))
    except ValueError as exc:
        raise CheckpointError(f"{exc} (in {where}.overrides)") from exc
    skipped = qc.get("modules_to_not_convert") or []
    both = sorted(set(skipped) & set(modules))
    if both:
        raise CheckpointError(
            f"lowbit: {where} lists {both[0]!r} both as quantized (modules) and in modules_to_not_convert"
        )
    return dict(qc)


def _check_spec(spec: Any, where: str, version: int = FORMAT_VERSION) -> None:
    if not isinstance(spec, Mapping):
        raise CheckpointError(f"lowbit: {where} must be a JSON object")
    missing = sorted(_SPEC_KEYS - set(spec))
    unknown = sorted(set(spec) - _SPEC_KEYS - _OPTIONAL_SPEC_KEYS[version])
    if missing:
        raise CheckpointError(f"lowbit: {where} lacks {missing[0]!r}")
    if unknown:
        later = [v for v, keys in _OPTIONAL_SPEC_KEYS.items() if unknown[0] in keys]
        hint = f"it needs format_version {later[0]}" if later else "newer lowbit?"
        raise CheckpointError(f"lowbit: {where} has an unknown field {unknown[0]!r} ({hint})")
    _check_dtype(spec["dtype"], f"{where}.dtype")
    if spec.get("adapter") is not None:
        _check_adapter_spec(spec["adapter"], f"{where}.adapter")
    try:
        format.check_bits(spec["bits"])
        format.check_in_features(spec["in_features"])
        format.check_group_size(spec["group_size"], spec["in_features"])
    except ValueError as exc:
        raise CheckpointError(f"{exc} (in {where})") from exc
    if not (isinstance(spec["out_features"], int) and spec["out_features"] > 0):
        raise CheckpointError(f"lowbit: {where}.out_features must be a positive integer")


def _check_dtype(name: Any, where: str) -> None:
    if name not in _DTYPES:
        raise CheckpointError(f"lowbit: {where} must be one of {sorted(_DTYPES)}, got {name!r}")


def _check_adapter_spec(adapter: Any, where: str) -> None:
    if not isinstance(adapter, Mapping) or set(adapter) != _ADAPTER_KEYS:
        raise CheckpointError(
            f"lowbit: {where} must be a JSON object with exactly the keys 'rank' and 'dtype', got {adapter!r}"
        )
    rank = adapter["rank"]
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise CheckpointError(f"lowbit: {where}.rank must be a positive integer, got {rank!r}")
    _check_dtype(adapter["dtype"], f"{where}.dtype")


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
    tensors = unique_tensors(model)
    with atomic_directory(path) as tmp:
        write_safetensors(tensors, tmp, max_shard_size)
        save_config_files(model, tmp, quant_config, tokenizer)
    return Path(path)


# --- reading -------------------------------------------------------------------------


def read_model_config(path: str | os.PathLike) -> transformers.PretrainedConfig:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"lowbit: {path} is not a model directory (no config.json)")
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"lowbit: cannot read {path / 'config.json'}: {exc}") from exc


def build_skeleton(config: transformers.PretrainedConfig, dtype: torch.dtype | None) -> nn.Module:
    """The model with its parameters on the meta device (no memory); buffers are real."""
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


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


def _quantized_owner(key: str, model: nn.Module) -> tuple[str, QuantLinear] | None:
    """The name and QuantLinear holding tensor `key` (its own or its adapter's), if any."""
    name = key.rpartition(".")[0]
    for owner_name in (name, name.removesuffix(".adapter")):
        try:
            module = model.get_submodule(owner_name)
        except AttributeError:
            return None
        if isinstance(module, QuantLinear):
            return owner_name, module
    return None


def _describe(key: str, model: nn.Module) -> str:
    owner = _quantized_owner(key, model)
    if owner is None:
        return ""
    name, module = owner
    adapter = f", adapter rank {module.adapter.rank}" if module.adapter is not None else ""
    return f" for the quantized module {name} ({module.extra_repr()}{adapter})"


def _converted(key: str, t: torch.Tensor, ref: torch.Tensor, model: nn.Module, source: str) -> torch.Tensor:
    """A checkpoint tensor checked against the model's (meta) tensor and cast to its dtype.
    Tensors of quantized modules must match exactly (a cast would change their meaning)."""
    quantized = _quantized_owner(key, model) is not None
    if t.shape != ref.shape:
        raise CheckpointError(
            f"lowbit: {source}: tensor {key} has shape {list(t.shape)}, expected "
            f"{list(ref.shape)}{_describe(key, model)}"
        )
    if t.is_floating_point() != ref.is_floating_point() or (quantized and t.dtype != ref.dtype):
        raise CheckpointError(
            f"lowbit: {source}: tensor {key} has dtype {t.dtype}, expected {ref.dtype}{_describe(key, model)}"
        )
    if quantized and t.is_floating_point() and not torch.isfinite(t).all():
        raise CheckpointError(f"lowbit: {source}: tensor {key} contains NaN or Inf values")
    return t.to(ref.dtype)


def assign_tensors(
    model: nn.Module, tensors: Mapping[str, torch.Tensor] | SafetensorsCheckpoint, source: str
) -> None:
    """Loads every tensor into the skeleton, ties weights, and checks nothing is left out."""
    expected = model.state_dict()
    unexpected = [k for k in tensors.keys() if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"lowbit: {source} holds tensors the model does not have, e.g. {unexpected[0]} "
            f"({len(unexpected)} in all): the weights do not match the config"
        )
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    tied_names = set(tied) | set(tied.values())
    missing = [k for k in expected if k not in tensors and k not in tied_names]
    if missing:
        raise CheckpointError(
            f"lowbit: {source} lacks tensor {missing[0]}{_describe(missing[0], model)}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    state = {}
    for key in tqdm(
        list(tensors.keys()), desc="lowbit: loading tensors", leave=False, disable=len(expected) < 512
    ):
        t = tensors[key]
        state[key] = _converted(key, t, expected[key], model, source)
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except ValueError as exc:  # a module's own checks (e.g. a permutation that is not one)
        raise CheckpointError(f"lowbit: {source}: {exc}") from exc
    if tied:
        model.tie_weights()
    still_empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_empty:
        raise CheckpointError(f"lowbit: {source} lacks tensor {still_empty[0]}")


def tokenizer_files(path: Path) -> list[str]:
    """The tokenizer files present in a model directory."""
    return [f for f in _TOKENIZER_FILES if (path / f).exists()]


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside a checkpoint, or None if there is none."""
    if not tokenizer_files(Path(path)):
        return None
    return transformers.AutoTokenizer.from_pretrained(path)


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
    config = read_model_config(path)
    qc = check_quantization_config(
        getattr(config, "quantization_config", None), f"{path}/config.json quantization_config"
    )
    reader = SafetensorsCheckpoint(path)
    model = build_skeleton(config, dtype)
    install_quant_linears(model, qc["modules"])
    assign_tensors(model, reader, str(path))
    model.lowbit_config = recorded_settings(qc)
    return model.to(device).eval()


