"""`QuantConfig`: every setting of a quantization run, in one JSON-serialisable dataclass."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from lowbit import ops
from lowbit.overrides import (
    Scheme,
    check_group_size_setting,
    check_overrides,
    resolve_scheme,
)

# Fields that change where files go or what is printed, never the result.
_NOT_IN_FINGERPRINT = ("cache_dir", "progress")
# Fields a method fills in when they are left at None (see `QuantConfig.resolved`).
METHOD_DEFAULTED = ("nsamples", "seqlen", "epochs", "aug_loss")
# The same for the settings of particular methods (apiq, tesseraq); left at None
# for the methods whose defaults do not name them.
METHOD_SPECIFIC = (
    "lora_rank", "lora_alpha", "reg_lambda", "reg_variant", "reg_growth",
    "rounding_thresholds", "rounding_steps", "rounding_init",
)
REG_VARIANTS = ("before_lora", "after_lora")
ROUNDING_INITS = ("omniquant", "minmax")


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
                        is `lowbit.overrides.resolve_scheme` (see `scheme`).

    Method
      method            "rtn" (round-to-nearest, min-max; no data) or "omniquant"
                        (learnable weight clipping, block-wise reconstruction), or any
                        method registered with `lowbit.methods.register`.
      lr, weight_decay  per parameter group of the method, e.g. {"clip": 1e-2};
                        missing groups take the method's defaults.
      options           method-specific settings (see each method's docstring).

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

    Partial retraining (apiq) and adaptive rounding (tesseraq); None: the method's default
      lora_rank, lora_alpha  apiq's low-rank adapters, scale alpha / rank (64, 16).
      saliency          apiq's saliency regularizer: False (off), True (computed from
                        the calibration windows, under cache_dir if set) or the
                        directory written by `lowbit.compute_saliency`.
      reg_lambda        lambda of the regularizer R (1.0; see lowbit.methods.apiq for
                        the normalisation of R that makes it comparable across models).
      reg_variant       "before_lora" (R on Q(W)) or "after_lora" (on Q(W) + scale B A).
      reg_growth        m: block i uses lambda * m^i (1.0).
      stage_epochs      epochs per training stage, e.g. {"wpt": 15, "mixedt": 0,
                        "opt": 5} (apiq with saliency) or {"lwc": 2} (tesseraq's
                        clipping init); missing stages take the method's default.
      rounding_thresholds  tesseraq: the fraction of weights left soft after each
                        hardening stage, decreasing in (0, 1).
      rounding_steps    tesseraq: optimiser steps per hardening stage (250).
      rounding_init     tesseraq: "omniquant" (learn the clipping first, stage "lwc")
                        or "minmax".
      lr and weight_decay also take "<stage>.<group>" keys (e.g. "wpt.clip") that
      override a group's value in one stage.

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
    lora_rank: int | None = None
    lora_alpha: float | None = None
    saliency: bool | str = False
    reg_lambda: float | None = None
    reg_variant: str | None = None
    reg_growth: float | None = None
    stage_epochs: dict[str, int] = field(default_factory=dict)
    rounding_thresholds: tuple[float, ...] | None = None
    rounding_steps: int | None = None
    rounding_init: str | None = None
    device: str | None = None
    autocast: bool = True
    cache_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        self.skip = tuple(self.skip)
        self.overrides = check_overrides(self.overrides)  # also from (pattern, setting) pairs, order kept
        ops.check_bits(self.bits)
        check_group_size_setting(self.group_size)
        if not 0.0 <= self.sw_weight <= 1.0:
            raise ValueError(f"lowbit: sw_weight must be in [0, 1], got {self.sw_weight}")
        for name in ("sw_projections", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"lowbit: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("nsamples", "seqlen", "epochs"):  # 0 for methods without data
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"lowbit: {name} must be >= 0, got {value}")
        if self.scale_dtype not in (None, "float16", "bfloat16", "float32"):
            raise ValueError(
                f"lowbit: scale_dtype must be float16, bfloat16 or float32, got {self.scale_dtype!r}"
            )
        self._check_method_specific()

    def _check_method_specific(self) -> None:
        if self.rounding_thresholds is not None:
            self.rounding_thresholds = tuple(float(t) for t in self.rounding_thresholds)
            t = self.rounding_thresholds
            if not all(0.0 < x < 1.0 for x in t) or any(a <= b for a, b in zip(t, t[1:])):
                raise ValueError(f"lowbit: rounding_thresholds must decrease within (0, 1), got {list(t)}")
        for name, least in (("lora_rank", 1), ("rounding_steps", 0)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < least):
                raise ValueError(f"lowbit: {name} must be an integer >= {least}, got {value!r}")
        for name in ("reg_lambda", "reg_growth"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and value != float("inf")):
                raise ValueError(f"lowbit: {name} must be a finite number >= 0, got {value!r}")
        if self.reg_variant not in (None, *REG_VARIANTS):
            raise ValueError(f"lowbit: reg_variant must be one of {REG_VARIANTS}, got {self.reg_variant!r}")
        if self.rounding_init not in (None, *ROUNDING_INITS):
            raise ValueError(f"lowbit: rounding_init must be one of {ROUNDING_INITS}, got {self.rounding_init!r}")
        if not isinstance(self.saliency, (bool, str)):
            raise TypeError(f"lowbit: saliency must be True, False or a directory, got {self.saliency!r}")
        for stage, epochs in self.stage_epochs.items():
            if not isinstance(epochs, int) or epochs < 0:
                raise ValueError(f"lowbit: stage_epochs[{stage!r}] must be an integer >= 0, got {epochs!r}")

    # --- per-layer settings ------------------------------------------------------------

    def scheme(self, name: str) -> Scheme | None:
        """The bits and group size of the linear layer `name`, or None to keep it in full
        precision, by `lowbit.overrides.resolve_scheme` with this config's settings."""
        return resolve_scheme(name, self.bits, self.group_size, self.overrides, self.skip)

    # --- method defaults ---------------------------------------------------------------

    def resolved(self, defaults: dict[str, Any]) -> QuantConfig:
        """A copy with the None fields and missing lr/weight_decay groups filled from a
        method's `defaults` (which has the keys of METHOD_DEFAULTED, `lr` and `weight_decay`,
        and those of METHOD_SPECIFIC and `stage_epochs` that the method uses)."""
        changes = {k: defaults[k] for k in METHOD_DEFAULTED if getattr(self, k) is None}
        changes.update({k: defaults[k] for k in METHOD_SPECIFIC if getattr(self, k) is None and k in defaults})
        changes["lr"] = {**defaults.get("lr", {}), **self.lr}
        changes["weight_decay"] = {**defaults.get("weight_decay", {}), **self.weight_decay}
        changes["stage_epochs"] = {**defaults.get("stage_epochs", {}), **self.stage_epochs}
        return dataclasses.replace(self, **changes)

    # --- serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        # pairs, not an object: the first matching pattern wins, and JSON writers sort keys
        d["overrides"] = [[pattern, setting] for pattern, setting in self.overrides.items()]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"lowbit: unknown QuantConfig fields {unknown}")
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

