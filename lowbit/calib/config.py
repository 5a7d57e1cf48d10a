"""`QuantConfig`: every setting of a quantization run, in one JSON-serialisable dataclass.

The settings every method shares live here; each method declares its own in its
`Settings` (lowbit.calib.methods), kept in `QuantConfig.options`. Importing this
module loads no compiled kernels; constructing a config looks its method up.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from lowbit.errors import UsageError
from lowbit.format import DTYPE_NAMES, check_bits, check_group_size_setting
from lowbit.quant.schemes import MethodSettings, Scheme, check_overrides, resolve_scheme

# Fields that change where files go or what is printed, never the result.
_NOT_IN_FINGERPRINT = ("cache_dir", "progress")
# Learning rates of the end-to-end stage, per parameter group.
E2E_LR = {"scale": 5e-3, "lora": 1e-4}
# Fields a method fills in when they are left at None (see `QuantConfig.resolved`).
METHOD_DEFAULTED = ("nsamples", "seqlen", "epochs", "aug_loss")


@dataclass
class QuantConfig:
    """Settings of `lowbit.quantize`.

    Quantization grid
      bits, group_size  weights are stored in `bits` (2, 3, 4) with one scale and zero
                        per `group_size` consecutive inputs (a multiple of 32 dividing
                        in_features; None or -1: one group per row).
      scale_dtype       "float16", "bfloat16" or "float32"; None: bfloat16 for bf16
                        models, float16 otherwise.
      overrides         per-layer settings, `{pattern: {"bits": b, "group_size": g}}`
                        (either key may be left out) or `{pattern: None}` to keep the
                        layer in full precision (also accepted as a list of
                        (pattern, setting) pairs). The first matching pattern wins.
      skip              name patterns of linear layers kept in full precision unless an
                        override names them; `lm_head` by default (its weight is usually
                        tied to the input embedding). Patterns match a full name, its
                        last dotted components, or the whole name as a regex; the rule
                        is `lowbit.quant.schemes.resolve_scheme` (see `scheme`).

    Method
      method            "rtn" (round-to-nearest, min-max; no data) or "omniquant"
                        (learnable weight clipping, block-wise reconstruction), or any
                        method registered with `lowbit.calib.methods.register`.
      lr, weight_decay  per parameter group of the method, e.g. {"clip": 1e-2};
                        missing groups take the method's defaults.

    Reconstruction loss (block-wise methods)
      sw_weight         w in (1 - w) * base + w * SW, the sliced-Wasserstein
                        distribution-alignment term; 0 turns it off. 0.1 is the
                        published default when it is used.
      sw_projections    random unit directions per step (L), 128 by default.
      aug_loss          also match the full-precision block applied to the quantized
                        inputs (the second target, added to the first).

    Calibration budget (None: the method's default)
      nsamples, seqlen  calibration windows of `seqlen` tokens drawn at random
                        positions of the calibration text.
      epochs            passes over the calibration windows per block.
      batch_size        windows per optimiser step.
      seed              seeds window sampling, batch order and SW projections.

    Defaults per method (the published full recipes)
      rtn        no calibration data, no training.
      omniquant  nsamples=128, seqlen=2048, epochs=20 (40 at 2 bits), batch_size=1,
                 AdamW lr {"clip": 1e-2}, weight_decay {"clip": 0}, aug_loss at 2 bits
                 only. This takes hours on a CPU; see BENCHMARKS.md for small budgets.

    Method settings (None or absent: the method's default)
      options           the method's own settings, e.g. {"lora_rank": 8} for apiq or
                        {"rounding_steps": 50} for tesseraq; each method lists them in its
                        `Settings` (lowbit.calib.methods). They may also be passed as keyword
                        arguments, QuantConfig(method="apiq", lora_rank=8), and read as
                        attributes, config.lora_rank.

    End-to-end stage (after the block-wise pass; lowbit.calib.e2e)
      e2e_epochs        passes over the calibration windows training every layer's scales
                        (and adapters) against the full-precision model's logits; 0: off.
      e2e_lr            AdamW learning rates {"scale": ..., "lora": ...} (the scales train
                        as factors on their stored values); missing keys take E2E_LR.

    Execution
      device            "cpu", "cuda", "cuda:1", ...; None: CUDA when available. One
                        decoder block at a time lives there; activations stay on the CPU.
      autocast          bf16 autocast on CUDA (ignored on the CPU, which runs fp32).
      cache_dir         directory for per-block checkpoints: an interrupted run given the
                        same directory resumes after the last finished block and ends with
                        the same model as an uninterrupted one. None: no checkpoints.
      progress          tqdm progress bars.
    """

    bits: int = 3
    group_size: int | None = 64
    method: str = "omniquant"
    sw_weight: float = 0.0
    sw_projections: int = 128
    nsamples: int | None = None
    seqlen: int | None = None
    epochs: int | None = None
    batch_size: int = 1
    lr: dict[str, float] = field(default_factory=dict)
    weight_decay: dict[str, float] = field(default_factory=dict)
    aug_loss: bool | None = None
    seed: int = 0
    scale_dtype: str | None = None
    skip: tuple[str, ...] = ("lm_head",)
    overrides: dict[str, dict[str, int | None] | None] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    e2e_epochs: int = 0
    e2e_lr: dict[str, float] = field(default_factory=dict)
    device: str | None = None
    autocast: bool = True
    cache_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        self.skip = tuple(self.skip)
        self.overrides = check_overrides(self.overrides)  # also from (pattern, setting) pairs, order kept
        check_bits(self.bits)
        check_group_size_setting(self.group_size)
        if not 0.0 <= self.sw_weight <= 1.0:
            raise UsageError(f"lowbit: sw_weight must be in [0, 1], got {self.sw_weight}")
        for name in ("sw_projections", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"lowbit: {name} must be at least 1, got {getattr(self, name)}")
        unknown = sorted(set(self.e2e_lr) - set(E2E_LR))
        if unknown:
            raise UsageError(f"lowbit: e2e_lr has the groups {sorted(E2E_LR)}, not {unknown}")
        self.e2e_lr = {**E2E_LR, **self.e2e_lr}
        if isinstance(self.e2e_epochs, bool) or not (isinstance(self.e2e_epochs, int) and self.e2e_epochs >= 0):
            raise UsageError(f"lowbit: e2e_epochs must be an integer >= 0, got {self.e2e_epochs!r}")
        for name, minimum in (("lr", "> 0"), ("e2e_lr", "> 0"), ("weight_decay", ">= 0")):
            for group, value in getattr(self, name).items():
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                if not (ok and (value > 0 if minimum == "> 0" else value >= 0)):
                    raise UsageError(f"lowbit: {name}[{group!r}] must be a finite number {minimum}, got {value!r}")
        for name in ("nsamples", "seqlen", "epochs"):  # 0 for methods without data
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"lowbit: {name} must be >= 0, got {value}")
        if self.scale_dtype not in (None, *DTYPE_NAMES):
            raise UsageError(
                f"lowbit: scale_dtype must be float16, bfloat16 or float32, got {self.scale_dtype!r}"
            )
        from lowbit.calib.methods import check_method_settings  # the methods load the kernels

        self.options = check_method_settings(self.method, self.options)

    def __getattr__(self, name: str) -> Any:
        """The method's own settings read as attributes: config.lora_rank (its `Settings`
        default when it was not given)."""
        options = self.__dict__.get("options", {})
        if name in options:
            return options[name]
        if "method" in self.__dict__ and not name.startswith("_"):
            from lowbit.calib.methods import setting_default

            found, value = setting_default(self.method, name)
            if found:
                return value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # --- per-layer settings ------------------------------------------------------------

    def scheme(self, name: str) -> Scheme | None:
        """The bits and group size of the linear layer `name`, or None to keep it in full
        precision, by `lowbit.quant.schemes.resolve_scheme` with this config's settings."""
        return resolve_scheme(name, self.bits, self.group_size, self.overrides, self.skip)

    # --- method defaults ---------------------------------------------------------------

    def resolved(self, defaults: dict[str, Any]) -> QuantConfig:
        """A copy with what is left open filled from a method's `defaults`: the None fields
        of METHOD_DEFAULTED, missing lr/weight_decay groups, and missing method settings
        (the keys of `defaults` that are not fields; dict-valued ones merge by key)."""
        changes = {k: defaults[k] for k in METHOD_DEFAULTED if getattr(self, k) is None}
        for name in ("lr", "weight_decay"):
            _check_groups(self.method, name, getattr(self, name), defaults.get(name, {}))
        changes["lr"] = {**defaults.get("lr", {}), **self.lr}
        changes["weight_decay"] = {**defaults.get("weight_decay", {}), **self.weight_decay}
        options = {k: v for k, v in defaults.items() if k not in _FIELDS}
        for key, value in self.options.items():
            if value is None:
                continue
            both_dicts = isinstance(value, dict) and isinstance(options.get(key), dict)
            options[key] = {**options[key], **value} if both_dicts else value
        changes["options"] = options
        return dataclasses.replace(self, **changes)

    def record(self) -> MethodSettings:
        """What `lowbit.quantize` records as `model.lowbit_config` and checkpoints store:
        the method and every setting, the method's own ones among the rest."""
        settings = self.to_dict()
        settings.pop("method")
        settings.update(settings.pop("options"))
        return MethodSettings(self.method, settings)

    # --- serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        # pairs, not an object: the first matching pattern wins, and JSON writers sort keys
        d["overrides"] = [[pattern, setting] for pattern, setting in self.overrides.items()]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        unknown = sorted(set(d) - _FIELDS)
        if unknown:
            raise UsageError(f"lowbit: unknown QuantConfig fields {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        return cls.from_dict(json.loads(text))

    def fingerprint_dict(self) -> dict[str, Any]:
        """The settings that determine the quantized model (not where files go)."""
        d = self.to_dict()
        for name in _NOT_IN_FINGERPRINT:
            d.pop(name)
        return d


_FIELDS = {f.name for f in dataclasses.fields(QuantConfig)}


def _accept_method_settings(init):
    """QuantConfig(method="apiq", lora_rank=8): keyword arguments that are not fields are
    the method's own settings, added to `options`."""

    @functools.wraps(init)
    def __init__(self, *args, options: dict[str, Any] | None = None, **kwargs):
        own = {k: kwargs.pop(k) for k in list(kwargs) if k not in _FIELDS}
        init(self, *args, options={**(options or {}), **own}, **kwargs)

    return __init__


QuantConfig.__init__ = _accept_method_settings(QuantConfig.__init__)


def _check_groups(method: str, name: str, given: dict[str, float], defaults: dict[str, float]) -> None:
    """`given` names only parameter groups the method has (a group, or STAGE.GROUP)."""
    for group in given:
        if group not in defaults and group.rpartition(".")[2] not in defaults:
            known = ", ".join(defaults) or "none"
            raise UsageError(f"lowbit: {method} has no {name} group {group!r} (its groups: {known})")
