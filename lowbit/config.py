"""`QuantConfig`: every setting of a quantization run, in one JSON-serialisable dataclass."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from lowbit import ops
from lowbit.convert import name_matches

# Fields that change where files go or what is printed, never the result.
_NOT_IN_FINGERPRINT = ("cache_dir", "progress")
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
      skip              name patterns (exact, dotted suffix or full regex) of linear
                        layers kept in full precision; `lm_head` by default (its weight
                        is usually tied to the input embedding).
      overrides         per-layer settings, `{pattern: {"bits": b, "group_size": g}}`
                        (either key may be left out) or `{pattern: None}` to keep the
                        layer in full precision. The first matching pattern wins; see
                        `layer_settings`.

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
    device: str | None = None
    autocast: bool = True
    cache_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        self.skip = tuple(self.skip)
        ops.check_bits(self.bits)
        _check_group_size_value(self.group_size)
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
        for pattern, setting in self.overrides.items():
            _check_override(pattern, setting)

    # --- per-layer settings ------------------------------------------------------------

    def layer_settings(self, name: str) -> tuple[int, int | None] | None:
        """(bits, group_size) for the linear layer `name`, or None to keep it in full
        precision. `skip` wins, then the first matching `overrides` pattern, then the
        global bits and group_size."""
        if any(name_matches(name, p) for p in self.skip):
            return None
        for pattern, setting in self.overrides.items():
            if name_matches(name, pattern):
                if setting is None:
                    return None
                return setting.get("bits", self.bits), setting.get("group_size", self.group_size)
        return self.bits, self.group_size

    # --- method defaults ---------------------------------------------------------------

    def resolved(self, defaults: dict[str, Any]) -> QuantConfig:
        """A copy with the None fields and missing lr/weight_decay groups filled from a
        method's `defaults` (which has the keys of METHOD_DEFAULTED, `lr` and `weight_decay`)."""
        changes = {k: defaults[k] for k in METHOD_DEFAULTED if getattr(self, k) is None}
        changes["lr"] = {**defaults.get("lr", {}), **self.lr}
        changes["weight_decay"] = {**defaults.get("weight_decay", {}), **self.weight_decay}
        return dataclasses.replace(self, **changes)

    # --- serialisation -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
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


def _check_group_size_value(group_size: int | None) -> None:
    if group_size in (None, -1):
        return
    if not (isinstance(group_size, int) and group_size > 0 and group_size % ops.BLOCK == 0):
        raise ValueError(
            f"lowbit: group_size must be a positive multiple of 32, None or -1, got {group_size!r}"
        )


def _check_override(pattern: str, setting: dict | None) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"lowbit: override pattern {pattern!r} is not a valid regex: {exc}") from exc
    if setting is None:
        return
    if not isinstance(setting, dict) or set(setting) - {"bits", "group_size"}:
        raise ValueError(
            f"lowbit: override {pattern!r} must be None or a dict with keys 'bits' and/or "
            f"'group_size', got {setting!r}"
        )
    if "bits" in setting:
        ops.check_bits(setting["bits"])
    if "group_size" in setting:
        _check_group_size_value(setting["group_size"])
