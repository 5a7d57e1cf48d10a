"""GPTQ interoperability: `export_gptq` writes the GPTQ v2 layout, `load_gptq` reads v1 and v2.

Per quantized linear layer (K = in_features, N = out_features, G = groups):

    qweight  int32 [K * bits / 32, N]      codes packed along K
    qzeros   int32 [G, ceil(N * bits / 32)] zero points packed along N
    scales   fp16  [G, N]
    g_idx    int32 [K]                      group of each input channel
    bias     fp16  [N]                      optional

    W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])

Packing is one little-endian bit stream per column (qweight) or row (qzeros):
value i occupies bits [i * bits, (i + 1) * bits) of the concatenated 32-bit
words, so at 3 bits 32 values fill 3 words and two of them straddle words.
Version 1 checkpoints store z - 1 (kernels add the 1 back); version 2 stores
z. docs/CHECKPOINTS.md has the details and the act-order mapping.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import format
from lowbit._version import __version__
from lowbit.errors import CheckpointError, UsageError
from lowbit.io.checkpoint import (
    assign_tensors,
    build_skeleton,
    check_saveable,
    install_quant_linears,
    module_spec,
    quant_modules,
    save_config_files,
)
from lowbit.io.files import (
    DEFAULT_MAX_SHARD_SIZE,
    SafetensorsCheckpoint,
    atomic_directory,
    read_json_file,
    unique_tensors,
    write_safetensors,
)
from lowbit.io.patterns import SafePattern
from lowbit.io.validate import check_tensors, open_checkpoint
from lowbit.nn import PermutedQuantLinear, QuantLinear
from lowbit.nn.modules import linear_layers, linear_weight
from lowbit.quant.schemes import MethodSettings

GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
_MASK32 = 0xFFFFFFFF

# --- bit-stream packing ------------------------------------------------------------------


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> int32 with the same bits."""
    return (words - ((words >> 31) << 32)).to(torch.int32)


def _stream_positions(bits: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the 32 values of a block: their word, their bit shift in it, and whether they
    spill into the next word (only at 3 bits)."""
    start = torch.arange(32, device=device) * bits
    word, shift = start // 32, start % 32
    return word, shift, shift + bits > 32


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values [K, N] (K a multiple of 32, entries < 2**bits) -> int32 [K * bits / 32, N], each
    column one bit stream: every 32 values fill `bits` words."""
    k, n = values.shape
    v = values.to(torch.int64).reshape(k // 32, 32, n)
    word, shift, spills = _stream_positions(bits, values.device)
    words = torch.zeros(k // 32, bits, n, dtype=torch.int64, device=values.device)
    words.index_add_(1, word, (v << shift[:, None]) & _MASK32)  # disjoint fields: adding is OR
    words.index_add_(1, word[spills] + 1, v[:, spills] >> (32 - shift[spills])[:, None])
    return _to_int32(words.reshape(k // 32 * bits, n))


def unpack_rows(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The inverse of `pack_rows`: int32 [k * bits / 32, N] -> int64 [k, N]."""
    w = (words.to(torch.int64) & _MASK32).reshape(k // 32, bits, -1)
    word, shift, spills = _stream_positions(bits, words.device)
    values = w[:, word] >> shift[:, None]
    values[:, spills] |= w[:, word[spills] + 1] << (32 - shift[spills])[:, None]
    return (values & ((1 << bits) - 1)).reshape(k, -1)


def pack_columns(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values [G, N] -> int32 [G, ceil(N * bits / 32)], each row one bit stream."""
    g, n = values.shape
    padded = torch.nn.functional.pad(values.to(torch.int64), (0, -n % 32))
    return pack_rows(padded.T, bits).T[:, : -(-n * bits // 32)].contiguous()


def unpack_columns(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack_columns`: int32 [G, ceil(n * bits / 32)] -> int64 [G, n]."""
    padded_n = n + (-n % 32)
    full = torch.nn.functional.pad(words, (0, padded_n * bits // 32 - words.shape[1]))
    return unpack_rows(full.T, bits, padded_n).T[:, :n]


# --- export ------------------------------------------------------------------------------


def _gptq_group_size(module: QuantLinear) -> int:
    """GPTQ writes one group per row as -1."""
    return -1 if module.group_size == module.in_features else module.group_size


def _fits(module: QuantLinear, bits: int, group_size: int) -> bool:
    """Whether a layer is expressed by a GPTQ (bits, group_size) setting."""
    per_row = group_size == -1 and module.group_size == module.in_features
    return module.bits == bits and (group_size == module.group_size or per_row)


def _check_exportable(name: str, module: QuantLinear) -> None:
    z = module.zeros.float()
    maxq = 2**module.bits - 1
    bad = (z != z.round()) | (z < 0) | (z > maxq)
    if bad.any():
        raise UsageError(
            f"lowbit: cannot export {name} to GPTQ: {int(bad.sum())} of {z.numel()} zeros are not integers "
            f"in [0, {maxq}] (e.g. {z[bad][0].item():g}). GPTQ stores integer zero points; zeros from "
            "calibration that are fractional can only be kept in a lowbit checkpoint (save_quantized)"
        )
    if not torch.isfinite(module.scales.to(torch.float16)).all():
        raise UsageError(f"lowbit: cannot export {name} to GPTQ: its scales overflow float16")


def _gptq_tensors(module: QuantLinear) -> dict[str, torch.Tensor]:
    """A layer's GPTQ tensors (the caller has checked its zeros)."""
    g = module.group_size
    g_idx = torch.arange(module.in_features, device=module.packed.device) // g
    if isinstance(module, PermutedQuantLinear):  # stored channel j is input channel perm[j]
        g_idx = g_idx[torch.argsort(module.input_perm)]
    tensors = {
        "qweight": pack_rows(module.codes().T, module.bits),
        "qzeros": pack_columns(module.zeros.T.round(), module.bits),
        "scales": module.scales.T.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }
    if module.bias is not None:
        tensors["bias"] = module.bias.to(torch.float16)
    return tensors


def _warn_inexact_float16(layers: Mapping[str, QuantLinear]) -> None:
    """GPTQ stores scales and bias in float16; say so when that rounds them."""

    def exact(t: torch.Tensor | None) -> bool:
        return t is None or torch.equal(t.to(torch.float16).to(t.dtype), t)

    inexact = [n for n, m in layers.items() if not (exact(m.scales) and exact(m.bias))]
    if inexact:
        warnings.warn(
            f"lowbit: GPTQ stores float16 scales and biases; those of {len(inexact)} layers "
            f"(e.g. {inexact[0]}) were rounded to float16",
            stacklevel=3,
        )


def _default_scheme(layers: Mapping[str, QuantLinear]) -> tuple[int, int]:
    """The (bits, GPTQ group size) that most layers fit."""
    candidates = Counter((m.bits, _gptq_group_size(m)) for m in layers.values())
    return max(candidates, key=lambda c: sum(_fits(m, *c) for m in layers.values()))


def gptq_config(model: nn.Module, layers: Mapping[str, QuantLinear], dynamic: bool) -> dict[str, Any]:
    """The `quantization_config` of the GPTQ export, refusing mixes plain GPTQ cannot express."""
    bits, group_size = _default_scheme(layers)
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    special = {n: m for n, m in layers.items() if not _fits(m, bits, group_size)}
    full_precision = [n for n, m in linear_layers(model).items() if m is not output_layer]
    if (special or full_precision) and not dynamic:
        what = (
            f"{len(special)} layers (e.g. {next(iter(special))}) differ from {bits}-bit "
            f"group size {group_size}"
            if special
            else f"{len(full_precision)} linear layers (e.g. {full_precision[0]}) are left in full precision"
        )
        raise UsageError(
            f"lowbit: cannot export to plain GPTQ: {what}, and GPTQ has one bits/group_size for every "
            "layer. Pass dynamic=True to write per-module overrides in GPTQModel's `dynamic` syntax "
            "(read by GPTQModel and vLLM, not by transformers' GPTQ loader)"
        )
    config = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq_v2",
        "bits": bits,
        "group_size": group_size,
        "desc_act": any(isinstance(m, PermutedQuantLinear) for m in layers.values()),
        "sym": False,
        "pack_dtype": "int32",
        "lm_head": output_layer is not None and any(m is output_layer for m in layers.values()),
        "meta": {"quantizer": [f"lowbit:{__version__}"]},
    }
    recorded = getattr(model, "lowbit_config", None)
    if recorded is not None:
        config["meta"]["lowbit_method"] = recorded.to_dict().get("method")
    if special or full_precision:
        config["dynamic"] = {
            **{
                f"+:^{re.escape(n)}$": {"bits": m.bits, "group_size": _gptq_group_size(m)}
                for n, m in special.items()
            },
            **{f"-:^{re.escape(n)}$": {} for n in full_precision},
        }
    return config


def export_gptq(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    *,
    dynamic: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Writes a quantized model as a GPTQ v2 checkpoint (true zeros, `checkpoint_format: "gptq_v2"`).

    Needs integer zeros in [0, 2**bits - 1] (round-to-nearest and GPTQ-style
    methods give them). Layers with other bits/group sizes than most, or linear
    layers left in full precision (other than the output layer), need
    `dynamic=True`, which records them in GPTQModel's per-module `dynamic` table.
    Act-order layers (`PermutedQuantLinear`) are written with their `g_idx`.
    Layers with low-rank adapters are refused: merge them first (`lowbit.merge_adapters`).
    The directory appears complete or not at all, as with `save_quantized`.
    """
    check_saveable(model)
    layers = quant_modules(model)
    if not layers:
        raise UsageError("lowbit: the model has no QuantLinear layers to export")
    adapted = [name for name, module in layers.items() if module.adapter is not None]
    if adapted:
        raise UsageError(
            f"lowbit: cannot export to GPTQ: {len(adapted)} layers (e.g. {adapted[0]}) carry low-rank "
            "adapters, which GPTQ cannot store. Merge them into the codes first with "
            "lowbit.merge_adapters(model) (QuantLinear.merge_and_requantize on every layer), which "
            "rounds what they learned; or keep them in a lowbit checkpoint (save_quantized)"
        )
    for name, module in layers.items():
        _check_exportable(name, module)
    config = gptq_config(model, layers, dynamic)
    _warn_inexact_float16(layers)

    prefixes = tuple(f"{name}." for name in layers)
    tensors = {k: t for k, t in unique_tensors(model).items() if not k.startswith(prefixes)}
    for name, module in layers.items():
        tensors.update({f"{name}.{k}": t for k, t in _gptq_tensors(module).items()})
    with atomic_directory(path) as tmp:
        write_safetensors(tensors, tmp, max_shard_size)
        save_config_files(model, tmp, config, tokenizer)
        (tmp / "quantize_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


# --- import ------------------------------------------------------------------------------


def _read_gptq_config(path: Path, config) -> dict[str, Any]:
    qc = getattr(config, "quantization_config", None)
    if qc is None and os.path.lexists(path / "quantize_config.json"):
        qc = read_json_file(path, "quantize_config.json")
    if not isinstance(qc, Mapping):
        raise CheckpointError(
            f"lowbit: {path} has no GPTQ quantization_config (config.json or quantize_config.json)"
        )
    qc = dict(qc)
    method = qc.get("quant_method", "gptq")
    if method != "gptq":
        hint = " (a lowbit checkpoint: use lowbit.load_quantized)" if method == "lowbit" else ""
        raise CheckpointError(f"lowbit: {path} is quantized with {method!r}, not GPTQ{hint}")
    present = [key for key in ("checkpoint_format", "format") if key in qc]
    fmt = qc[present[0]] if present else "gptq"  # absent: v1, as AutoGPTQ writes it
    if not isinstance(fmt, str) or fmt.lower() not in ("gptq", "gptq_v2"):
        raise CheckpointError(
            f"lowbit: GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq' (v1) and 'gptq_v2')"
        )
    qc["checkpoint_format"] = fmt.lower()
    for key in ("bits", "group_size"):
        if not format.is_int(qc.get(key)):
            raise CheckpointError(f"lowbit: the GPTQ quantization_config lacks an integer {key!r}")
    qc["dynamic"] = _read_dynamic(qc.get("dynamic"))
    return qc


def _read_dynamic(dynamic: Any) -> list[tuple[str, SafePattern, dict[str, Any]]]:
    """GPTQModel's `dynamic` table as (sign, pattern, setting) entries, in order: each key a
    regular expression with an optional "+:" (quantize with the setting) or "-:" (leave in full
    precision) prefix, each value an object whose bits and group_size are integers. The
    patterns are data: matched in bounded time (`lowbit.io.patterns`)."""
    if dynamic is None:
        return []
    if not isinstance(dynamic, Mapping):
        raise CheckpointError(
            f"lowbit: the GPTQ dynamic table must be an object of pattern -> settings, got {dynamic!r}"
        )
    entries = []
    for key, setting in dynamic.items():
        if not isinstance(key, str) or not isinstance(setting, Mapping):
            raise CheckpointError(
                f"lowbit: the GPTQ dynamic entry {key!r} must map a pattern to an object, got {setting!r}"
            )
        sign, regex = (key[0], key[2:]) if key[:2] in ("+:", "-:") else ("+", key)
        try:
            pattern = SafePattern(regex)
        except ValueError as exc:
            raise CheckpointError(f"{exc} (the GPTQ dynamic entry {key!r})") from exc
        for name in ("bits", "group_size"):
            if name in setting and not format.is_int(setting[name]):
                raise CheckpointError(
                    f"lowbit: the GPTQ dynamic entry {key!r} has a {name} that is not an integer: {setting[name]!r}"
                )
        entries.append((sign, pattern, dict(setting)))
    return entries


def _dynamic_scheme(name: str, qc: Mapping[str, Any]) -> tuple[int, int]:
    """bits and group size of GPTQ layer `name` under GPTQModel's `dynamic` table: the first
    pattern that matches the name's start decides; "-:" patterns mean full precision."""
    for sign, pattern, setting in qc["dynamic"]:
        if pattern.match(name):
            if sign == "-":
                raise CheckpointError(
                    f"lowbit: the GPTQ dynamic entry {sign}:{pattern.pattern!r} leaves {name} in full "
                    f"precision, but the checkpoint holds {name}.qweight"
                )
            return setting.get("bits", qc["bits"]), setting.get("group_size", qc["group_size"])
    return qc["bits"], qc["group_size"]


def _expect_shape(key: str, t: torch.Tensor, shape: list[int], scheme: str) -> None:
    if list(t.shape) != shape:
        raise CheckpointError(
            f"lowbit: GPTQ tensor {key} has shape {list(t.shape)}, but {scheme} implies {shape}"
        )


def gptq_layer(
    name: str,
    tensors: Mapping[str, torch.Tensor],
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int,
    version: int,
) -> QuantLinear:
    """One GPTQ layer as a QuantLinear (a PermutedQuantLinear if its g_idx is act-order)."""
    k, n = in_features, out_features
    scheme = f"bits={bits}, group_size={group_size}, {k} -> {n} features"
    try:
        format.check_bits(bits)
        format.check_in_features(k)
        g = k if group_size == -1 else group_size
        format.check_group_size(g, k)
    except ValueError as exc:
        raise CheckpointError(f"{exc}: GPTQ layer {name} cannot be held in lowbit's format") from exc
    groups = k // g
    qweight, qzeros, scales = (tensors[f"{name}.{t}"] for t in ("qweight", "qzeros", "scales"))
    _expect_shape(f"{name}.qweight", qweight, [k * bits // 32, n], scheme)
    _expect_shape(f"{name}.qzeros", qzeros, [groups, -(-n * bits // 32)], scheme)
    _expect_shape(f"{name}.scales", scales, [groups, n], scheme)
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise CheckpointError(
            f"lowbit: GPTQ tensors {name}.qweight and .qzeros must be int32 (pack_dtype int32)"
        )
    bias = tensors.get(f"{name}.bias")
    if scales.dtype not in format.FLOAT_DTYPES or (bias is not None and bias.dtype != scales.dtype):
        raise CheckpointError(
            f"lowbit: GPTQ tensor {name}.scales must be float16, bfloat16 or float32 and {name}.bias "
            f"(if any) of the same dtype; got {scales.dtype}"
            + (f" and {bias.dtype}" if bias is not None else "")
        )
    if bias is not None:
        _expect_shape(f"{name}.bias", bias, [n], scheme)
    for key, t in ((f"{name}.scales", scales), (f"{name}.bias", bias)):
        if t is not None and not torch.isfinite(t).all():
            raise CheckpointError(f"lowbit: GPTQ tensor {key} contains NaN or Inf values")

    codes = unpack_rows(qweight, bits, k).T.to(torch.uint8)
    zeros = unpack_columns(qzeros, bits, n) + (1 if version == 1 else 0)  # v1 stores z - 1
    scales = scales.T.contiguous()
    layer_args = dict(bits=bits, group_size=g)

    contiguous = torch.arange(k) // g
    g_idx = tensors.get(f"{name}.g_idx")
    if g_idx is not None and (g_idx.dtype not in (torch.int32, torch.int64) or list(g_idx.shape) != [k]):
        raise CheckpointError(
            f"lowbit: GPTQ tensor {name}.g_idx must be int32 [{k}], got {g_idx.dtype} {list(g_idx.shape)}"
        )
    if g_idx is None or torch.equal(g_idx.long(), contiguous):
        return QuantLinear.from_quantized(codes, scales, zeros.T.to(scales.dtype), bias, **layer_args)
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], contiguous):
        raise CheckpointError(
            f"lowbit: GPTQ tensor {name}.g_idx does not give each of the {groups} groups exactly {g} "
            "input channels, which lowbit's format cannot express"
        )
    layer = QuantLinear.from_quantized(codes[:, perm], scales, zeros.T.to(scales.dtype), bias, **layer_args)
    return PermutedQuantLinear.from_permuted(layer, perm)


def _gptq_layer_names(meta: nn.Module, reader: SafetensorsCheckpoint, path: Path) -> list[str]:
    """The linear layers the checkpoint holds in GPTQ form (a `qweight`), checked against the
    model built on the meta device: each a linear layer with exactly the GPTQ tensors, and the
    full-precision rest with the model's names, dtypes and shapes."""
    linears = linear_layers(meta)
    names = [key.removesuffix(".qweight") for key in reader.keys() if key.endswith(".qweight")]
    if not names:
        raise CheckpointError(f"lowbit: {path} has no GPTQ layers (no *.qweight tensors)")
    for name in names:
        if name not in linears:
            raise CheckpointError(f"lowbit: {path} holds {name}.qweight, but {name} is not a linear layer of the model")
        for t in ("qzeros", "scales"):
            if f"{name}.{t}" not in reader:
                raise CheckpointError(f"lowbit: {path} lacks tensor {name}.{t}")
    layers = set(names)
    for key in reader.keys():
        owner, _, tensor = key.rpartition(".")
        if owner in layers and tensor not in GPTQ_TENSORS:
            raise CheckpointError(f"lowbit: {path} holds tensor {key}, which is not a GPTQ layer's")
    for tensor in ("scales", "bias"):  # one dtype for all layers: the format records none
        dtypes = {reader.header(f"{n}.{tensor}")[0]: n for n in names if f"{n}.{tensor}" in reader}
        if len(dtypes) > 1:
            found = ", ".join(f"{n}.{tensor} {d}" for d, n in dtypes.items())
            raise CheckpointError(f"lowbit: {path}: the GPTQ layers' {tensor} differ in dtype ({found})")
    check_tensors(meta, reader, str(path), skipped_modules=tuple(names))
    return names


def check_gptq_checkpoint(path: Path, dtype: torch.dtype | None = None):
    """(config without quantization_config, GPTQ config, tensors, GPTQ layer names) of a GPTQ
    checkpoint, with everything checked that can be without reading tensor data."""
    config, reader = open_checkpoint(path)
    qc = _read_gptq_config(path, config)
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the imported model is a lowbit model
    layers = _gptq_layer_names(build_skeleton(config, dtype, meta=True), reader, path)
    return config, qc, reader, layers


def load_gptq(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Imports a GPTQ checkpoint (v1 or v2, 2/3/4-bit, with or without act-order) exactly.

    Each layer becomes a `QuantLinear` computing the same weights the GPTQ
    kernels compute (v1 zero points are stored minus one and read plus one).
    An act-order `g_idx` becomes a `PermutedQuantLinear`: its input channels are
    sorted by group, and the activations permuted to match. Returns the model
    in eval mode on `device`; save it with `lowbit.save_quantized`.
    """
    path = Path(path)
    config, qc, reader, layers = check_gptq_checkpoint(path, dtype)
    version = 2 if qc["checkpoint_format"] == "gptq_v2" else 1
    model = build_skeleton(config, dtype)

    tensors = {}
    specs = {}
    for name, linear in linear_layers(model).items():
        if name not in layers:
            continue
        n, k = linear_weight(linear).shape
        bits, group_size = _dynamic_scheme(name, qc)
        gptq = {f"{name}.{t}": reader[f"{name}.{t}"] for t in GPTQ_TENSORS if f"{name}.{t}" in reader}
        layer = gptq_layer(name, gptq, k, n, bits, group_size, version)
        specs[name] = module_spec(layer)
        tensors.update({f"{name}.{key}": t for key, t in layer.state_dict().items()})
    prefixes = tuple(f"{name}." for name in layers)
    tensors.update({key: reader[key] for key in reader.keys() if not key.startswith(prefixes)})
    install_quant_linears(model, specs)
    assign_tensors(model, tensors, str(path))
    model.lowbit_config = MethodSettings(
        "gptq-import",
        {"checkpoint_format": qc["checkpoint_format"], "bits": qc["bits"], "group_size": qc["group_size"]},
    )
    return model.to(device).eval()
