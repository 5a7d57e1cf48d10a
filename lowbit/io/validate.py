"""The one validation of a model directory read from disk, shared by every load path
(`load_quantized`, `load_gptq`, `checkpoint_info`, the transformers quantizer, the CLI).

A checkpoint is data from anywhere, so before anything is built from it:

- its files are regular files inside the directory (`lowbit.io.files.contained_file`);
- `config.json` is UTF-8 JSON whose values have the types of the model's config class
  (3.0 is not 3, "64" is not 64, a bool is not an int), whose sizes are positive and
  bounded, and which asks for no code of its own (`auto_map`): lowbit never runs a
  checkpoint's Python files;
- the sizes are plausible for the tensors stored (a 20000-layer config over a few
  dozen tensors fails at once, not after building 20000 layers);
- the lowbit `quantization_config` has every field with its type and range;
- every tensor's name, dtype and shape, read from the safetensors headers, matches the
  model the config describes, built on the meta device (no memory); and the data,
  once read, is finite.

Every refusal is a `CheckpointError` naming the file, key or tensor.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from lowbit import format
from lowbit.errors import CheckpointError
from lowbit.io.files import SafetensorsCheckpoint, contained_file, containment_root, read_json_file
from lowbit.nn import QuantLinear
from lowbit.quant.schemes import check_overrides

QUANT_METHOD = "lowbit"
FORMAT_VERSION = 2  # 2 added the "adapter" field of module entries
READABLE_VERSIONS = (1, 2)

# A lowbit checkpoint's config.json asks for this attention implementation, which no
# transformers has: a process without lowbit's quantizer then refuses to build the model,
# naming it, instead of loading random weights in place of the packed ones. lowbit's readers
# drop it (`drop_load_guard`). docs/CHECKPOINTS.md, "Loading without lowbit".
LOAD_GUARD = "lowbit-checkpoint: `import lowbit` (pip install lowbit) before loading this model"

DTYPES = format.DTYPE_NAMES
SPEC_KEYS = {"bits", "group_size", "in_features", "out_features", "bias", "dtype"}
# Optional module-entry fields, by the format version that introduced them.
OPTIONAL_SPEC_KEYS = {1: {"input_perm"}, 2: {"input_perm", "adapter"}}
ADAPTER_KEYS = {"rank", "dtype"}

# Model-config sizes: positive integers, at most MAX_SIZE (positions: MAX_POSITIONS, as
# some models allocate buffers by them), and at most the number of values stored.
SIZE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "ffn_dim", "word_embed_proj_dim", "n_embd", "n_layer", "n_head",
    "n_inner", "d_model", "num_layers", "num_heads", "max_position_embeddings", "n_positions", "n_ctx",
)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
MAX_SIZE = 1 << 24
MAX_POSITIONS = 1 << 21
MODEL_DTYPES = ("float16", "bfloat16", "float32", "float64")


# --- config.json -------------------------------------------------------------------------


def read_config_json(path: Path) -> dict[str, Any]:
    """config.json of a model directory, checked (module docstring) but not yet interpreted."""
    if not os.path.lexists(path / "config.json"):
        raise CheckpointError(f"lowbit: {path} is not a model directory (no config.json)")
    raw = read_json_file(path, "config.json")
    check_model_config(raw, path / "config.json")
    return raw


def refuse_custom_code(raw: Any, file: Path) -> None:
    if isinstance(raw, Mapping) and "auto_map" in raw:
        raise CheckpointError(
            f"lowbit: {file} names Python code of its own (auto_map); lowbit never runs code from a "
            "checkpoint (trust_remote_code=False), so it cannot load this model"
        )


def check_model_config(raw: Any, file: Path) -> None:
    """The model config's values against the types of its config class's defaults, and its sizes."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"lowbit: {file} must hold a JSON object, got {type(raw).__name__}")
    refuse_custom_code(raw, file)
    if raw.get("quantization_config") is not None and not isinstance(raw["quantization_config"], Mapping):
        raise CheckpointError(
            f"lowbit: {file}: quantization_config must be a JSON object, got {raw['quantization_config']!r}"
        )
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise CheckpointError(f"lowbit: {file}: model_type {model_type!r} is not a model type transformers knows")
    defaults = transformers.CONFIG_MAPPING[model_type]().to_dict()
    for key, value in raw.items():
        _check_config_value(key, value, defaults.get(key), file)
    for key in ("dtype", "torch_dtype"):
        if raw.get(key) is not None and raw[key] not in MODEL_DTYPES:
            raise CheckpointError(f"lowbit: {file}: {key} must be one of {list(MODEL_DTYPES)}, got {raw[key]!r}")
    architectures = raw.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise CheckpointError(f"lowbit: {file}: architectures must be a list of class names")
    for key in SIZE_KEYS:
        if raw.get(key) is not None or (key in raw and defaults.get(key) is not None):
            _check_size(key, raw[key], file)


def _check_config_value(key: str, value: Any, default: Any, file: Path) -> None:
    """A value of the type its default has (ints where the default is an int, ...); None is
    left to transformers where the default is not an int or bool."""
    if key.endswith("_token_id"):
        ids = value if isinstance(value, list) else [value]
        if not all(v is None or format.is_int(v) for v in ids):
            raise CheckpointError(f"lowbit: {file}: {key} must be a token id (an integer), got {value!r}")
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = format.is_int(value) or (value is None and key not in SIZE_KEYS)
    elif isinstance(default, float):
        ok = value is None or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    elif isinstance(default, str):
        ok = value is None or isinstance(value, str)
    else:
        return
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[type(default)]
        raise CheckpointError(f"lowbit: {file}: {key} must be {kind} (default {default!r}), got {value!r}")


def _check_size(key: str, value: Any, file: Path) -> None:
    limit = MAX_POSITIONS if key in POSITION_KEYS else MAX_SIZE
    if not (format.is_int(value) and 1 <= value <= limit):
        raise CheckpointError(f"lowbit: {file}: {key} must be an integer in [1, {limit}], got {value!r}")


def check_sizes_against_tensors(raw: Mapping[str, Any], reader: SafetensorsCheckpoint, file: Path) -> None:
    """Sizes no larger than what is stored: at least one tensor per layer, no dimension
    above the number of stored values. Reads only the headers."""
    tensors = reader.keys()
    stored = sum(math.prod(reader.header(key)[1]) for key in tensors)
    for key in LAYER_KEYS:
        if format.is_int(raw.get(key)) and raw[key] > len(tensors):
            raise CheckpointError(
                f"lowbit: {file}: {key} is {raw[key]}, but the checkpoint holds only {len(tensors)} tensors"
            )
    for key in SIZE_KEYS:
        if format.is_int(raw.get(key)) and raw[key] > stored:
            raise CheckpointError(
                f"lowbit: {file}: {key} is {raw[key]}, more than the {stored} values the checkpoint stores"
            )


def parse_model_config(path: Path) -> transformers.PretrainedConfig:
    """The transformers config of a directory whose config.json passed `read_config_json`."""
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # any refusal of the config's values is the checkpoint's fault
        raise CheckpointError(f"lowbit: cannot read {path / 'config.json'}: {_first_line(exc)}") from exc
    return drop_load_guard(config)


def drop_load_guard(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """The config with `LOAD_GUARD` replaced by transformers' default attention choice."""
    if getattr(config, "_attn_implementation", None) == LOAD_GUARD:
        config._attn_implementation = None
    return config


def read_model_config(path: str | os.PathLike) -> transformers.PretrainedConfig:
    """The validated model config of a model directory."""
    path = Path(path)
    read_config_json(path)
    return parse_model_config(path)


def open_tensors(path: str | os.PathLike) -> SafetensorsCheckpoint:
    """The tensors of a model directory, validated as far as can be before building the
    model: config.json, the containment of every file, sizes against the tensors."""
    path = Path(path)
    raw = read_config_json(path)
    check_directory(path)
    reader = SafetensorsCheckpoint(path)
    check_sizes_against_tensors(raw, reader, path / "config.json")
    return reader


def open_checkpoint(path: str | os.PathLike) -> tuple[transformers.PretrainedConfig, SafetensorsCheckpoint]:
    """(config, tensors) of a model directory, validated by `open_tensors`."""
    reader = open_tensors(path)
    return parse_model_config(Path(path)), reader


def check_directory(path: Path) -> None:
    """Every entry of a model directory lies inside it and is a regular file or a directory
    (transformers reads tokenizer files by name: none may lead out, block or loop)."""
    root = containment_root(path)
    for entry in sorted(path.iterdir()):
        real = Path(os.path.realpath(entry))
        if not real.is_relative_to(root):
            raise CheckpointError(f"lowbit: {entry} leads outside the checkpoint directory (to {real})")
        if entry.is_dir():
            continue
        contained_file(path, entry.name)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --- the lowbit quantization_config ----------------------------------------------------------


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
    if not format.is_int(version):
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
    _check_settings(qc, where)
    skipped = qc.get("modules_to_not_convert") or []
    if not (isinstance(skipped, list) and all(isinstance(n, str) for n in skipped)):
        raise CheckpointError(f"lowbit: {where}.modules_to_not_convert must be a list of module names")
    both = sorted(set(skipped) & set(modules))
    if both:
        raise CheckpointError(
            f"lowbit: {where} lists {both[0]!r} both as quantized (modules) and in modules_to_not_convert"
        )
    return dict(qc)


def _check_settings(qc: Mapping[str, Any], where: str) -> None:
    """The informational fields: what produced the weights, with which settings."""
    try:
        if qc.get("bits") is not None:
            format.check_bits(qc["bits"])
        format.check_group_size_setting(qc.get("group_size"))
        check_overrides(qc.get("overrides"))
    except ValueError as exc:
        raise CheckpointError(f"{exc} (in {where})") from exc
    for key in ("method", "lowbit_version"):
        if qc.get(key) is not None and not isinstance(qc[key], str):
            raise CheckpointError(f"lowbit: {where}.{key} must be a string, got {qc[key]!r}")
    if qc.get("method_config") is not None and not isinstance(qc["method_config"], Mapping):
        raise CheckpointError(f"lowbit: {where}.method_config must be a JSON object, got {qc['method_config']!r}")


def _check_spec(spec: Any, where: str, version: int = FORMAT_VERSION) -> None:
    if not isinstance(spec, Mapping):
        raise CheckpointError(f"lowbit: {where} must be a JSON object")
    missing = sorted(SPEC_KEYS - set(spec))
    unknown = sorted(set(spec) - SPEC_KEYS - OPTIONAL_SPEC_KEYS[version])
    if missing:
        raise CheckpointError(f"lowbit: {where} lacks {missing[0]!r}")
    if unknown:
        later = [v for v, keys in OPTIONAL_SPEC_KEYS.items() if unknown[0] in keys]
        hint = f"it needs format_version {later[0]}" if later else "newer lowbit?"
        raise CheckpointError(f"lowbit: {where} has an unknown field {unknown[0]!r} ({hint})")
    check_dtype_name(spec["dtype"], f"{where}.dtype")
    for key in ("bias", "input_perm"):
        if key in spec and not isinstance(spec[key], bool):
            raise CheckpointError(f"lowbit: {where}.{key} must be true or false, got {spec[key]!r}")
    if spec.get("adapter") is not None:
        _check_adapter_spec(spec["adapter"], f"{where}.adapter")
    try:
        format.check_bits(spec["bits"])
        format.check_in_features(spec["in_features"])
        format.check_group_size(spec["group_size"], spec["in_features"])
    except ValueError as exc:
        raise CheckpointError(f"{exc} (in {where})") from exc
    out_features = spec["out_features"]
    if not (format.is_int(out_features) and 0 < out_features <= MAX_SIZE):
        raise CheckpointError(f"lowbit: {where}.out_features must be a positive integer, got {out_features!r}")
    if spec["in_features"] > MAX_SIZE:
        raise CheckpointError(f"lowbit: {where}.in_features must be at most {MAX_SIZE}")


def check_dtype_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or name not in DTYPES:
        raise CheckpointError(f"lowbit: {where} must be one of {sorted(DTYPES)}, got {name!r}")


def _check_adapter_spec(adapter: Any, where: str) -> None:
    if not isinstance(adapter, Mapping) or set(adapter) != ADAPTER_KEYS:
        raise CheckpointError(
            f"lowbit: {where} must be a JSON object with exactly the keys 'rank' and 'dtype', got {adapter!r}"
        )
    rank = adapter["rank"]
    if not (format.is_int(rank) and 1 <= rank <= MAX_SIZE):
        raise CheckpointError(f"lowbit: {where}.rank must be a positive integer, got {rank!r}")
    check_dtype_name(adapter["dtype"], f"{where}.dtype")


# --- tensors -----------------------------------------------------------------------------


def quantized_owner(key: str, model: nn.Module) -> tuple[str, QuantLinear] | None:
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


def describe(key: str, model: nn.Module) -> str:
    owner = quantized_owner(key, model)
    if owner is None:
        return ""
    name, module = owner
    adapter = f", adapter rank {module.adapter.rank}" if module.adapter is not None else ""
    return f" for the quantized module {name} ({module.extra_repr()}{adapter})"


def tied_targets(model: nn.Module) -> set[str]:
    """Names that a weight tie fills from another tensor (not stored)."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def check_tensor_names(model: nn.Module, names: list[str], source: str, skipped: tuple[str, ...] = ()) -> None:
    """The stored names are the model's, none missing, and none that a weight tie would
    overwrite (a tie the config declares but the tensors contradict). `skipped`: prefixes
    of tensors checked elsewhere."""
    expected = [k for k in model.state_dict() if not k.startswith(skipped)]
    unexpected = [k for k in names if k not in set(expected)]
    if unexpected:
        raise CheckpointError(
            f"lowbit: {source} holds tensors the model does not have, e.g. {unexpected[0]} "
            f"({len(unexpected)} in all): the weights do not match the config"
        )
    tied = tied_targets(model)
    overwritten = sorted(tied & set(names))
    if overwritten:
        raise CheckpointError(
            f"lowbit: {source} holds tensor {overwritten[0]}, which the config ties to "
            f"{model.all_tied_weights_keys[overwritten[0]]} (tie_word_embeddings contradicts the weights)"
        )
    present = set(names)
    missing = [k for k in expected if k not in present and k not in tied]
    if missing:
        raise CheckpointError(
            f"lowbit: {source} lacks tensor {missing[0]}{describe(missing[0], model)}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )


def check_tensor_header(
    key: str, dtype: torch.dtype, shape: tuple[int, ...], ref: torch.Tensor, model: nn.Module, source: str
) -> None:
    """One stored tensor against the model's (meta) tensor: the same shape; the exact dtype for
    quantized modules and integer tensors; any float dtype for the full-precision floats (cast
    to the model's dtype on load, as `from_pretrained` does)."""
    if tuple(shape) != tuple(ref.shape):
        raise CheckpointError(
            f"lowbit: {source}: tensor {key} has shape {list(shape)}, expected {list(ref.shape)}{describe(key, model)}"
        )
    exact = quantized_owner(key, model) is not None or not ref.is_floating_point()
    if dtype.is_floating_point != ref.is_floating_point() or (exact and dtype != ref.dtype):
        raise CheckpointError(
            f"lowbit: {source}: tensor {key} has dtype {dtype}, expected {ref.dtype}{describe(key, model)}"
        )


def check_tensors(
    model: nn.Module, reader: SafetensorsCheckpoint, source: str, skipped_modules: tuple[str, ...] = ()
) -> None:
    """Every stored tensor's name, dtype and shape against `model` (built on the meta device
    with its quantized modules installed), from the headers alone. `skipped_modules`: modules
    whose tensors are checked elsewhere (GPTQ layers)."""
    skipped = tuple(f"{name}." for name in skipped_modules)
    names = [k for k in reader.keys() if not k.startswith(skipped)]
    check_tensor_names(model, names, source, skipped)
    expected = model.state_dict()
    for key in names:
        dtype, shape = reader.header(key)
        check_tensor_header(key, dtype, shape, expected[key], model, source)


def check_finite(key: str, t: torch.Tensor, source: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise CheckpointError(f"lowbit: {source}: tensor {key} contains NaN or Inf values")
