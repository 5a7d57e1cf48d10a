"""Per-module quantization settings: which layers get which bits and group size.

One resolution rule, shared by every quantization method and by checkpoints:

- `overrides` maps a pattern (see `name_matches`: a full name, its last dotted
  components, or a regular expression matching the whole name) to
  `{"bits": b, "group_size": g}` (either key may be left out to keep the
  default) or to `None` to leave the layer in full precision. The first
  matching pattern wins, in the table's order.
- A layer that no override names is skipped if it matches a `skip` pattern
  (by default `lm_head`), and otherwise uses the default bits and group size.

So an override is also how a layer that `skip` would leave out (e.g. `lm_head`)
is opted in: `overrides={"lm_head": {"bits": 4}}`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lowbit.errors import UsageError
from lowbit.format import check_bits, check_group_size_setting

Setting = Mapping[str, int | None] | None
# A mapping, or a sequence of (pattern, setting) pairs: the form checkpoints store,
# since JSON writers may reorder the keys of an object and order matters here.
Overrides = Mapping[str, Setting] | Sequence[tuple[str, Setting]]

_OVERRIDE_KEYS = {"bits", "group_size"}


@dataclass(frozen=True)
class Scheme:
    """How one layer is quantized. `group_size` None (or -1) means one group per row."""

    bits: int
    group_size: int | None


def name_matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern equal to it, to its last dotted components, or
    matching it as a full regular expression (`lm_head`, `mlp.down_proj`, `.*\\.0\\..*`)."""
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def check_overrides(overrides: Overrides | None) -> dict[str, dict[str, int | None] | None]:
    """Validates an override table and returns it as a plain ordered dict (JSON-ready)."""
    checked: dict[str, dict[str, int | None] | None] = {}
    if isinstance(overrides, str) or (overrides is not None and not isinstance(overrides, (Mapping, Sequence))):
        raise UsageError(
            f"lowbit: overrides must map patterns to settings (a dict or (pattern, setting) pairs), "
            f"got {overrides!r}"
        )
    pairs = overrides.items() if isinstance(overrides, Mapping) else (overrides or ())
    for pair in pairs:
        if not (isinstance(pair, Sequence) and len(pair) == 2 and isinstance(pair[0], str)):
            raise UsageError(f"lowbit: overrides must map patterns to settings, got the entry {pair!r}")
        pattern, setting = pair
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UsageError(
                f"lowbit: override pattern {pattern!r} is not a valid regular expression: {exc}"
            ) from exc
        if setting is None:
            checked[pattern] = None
            continue
        if not isinstance(setting, Mapping) or not set(setting) <= _OVERRIDE_KEYS:
            raise UsageError(
                f"lowbit: override {pattern!r} must be None (skip) or a dict with keys "
                f"'bits' and/or 'group_size', got {setting!r}"
            )
        setting = dict(setting)
        if "bits" in setting:
            check_bits(setting["bits"])
        check_group_size_setting(setting.get("group_size"), f"override {pattern!r}: group_size")
        checked[pattern] = setting
    return checked


def matching_override(name: str, overrides: Overrides | None) -> tuple[str, Setting] | None:
    """The first (pattern, setting) of `overrides` whose pattern matches `name`, if any."""
    for pattern, setting in check_overrides(overrides).items():
        if name_matches(name, pattern):
            return pattern, setting
    return None


def resolve_scheme(
    name: str,
    bits: int,
    group_size: int | None,
    overrides: Overrides | None = None,
    skip: Iterable[str] = ("lm_head",),
) -> Scheme | None:
    """The scheme of layer `name`, or None if it stays in full precision (module docstring)."""
    match = matching_override(name, overrides)
    if match is not None:
        setting = match[1]
        return (
            None
            if setting is None
            else Scheme(setting.get("bits", bits), setting.get("group_size", group_size))
        )
    if any(name_matches(name, p) for p in skip):
        return None
    return Scheme(bits, group_size)


@dataclass
class MethodSettings:
    """What produced a quantized model: the method's name and its settings, recorded as
    `model.lowbit_config` by every quantization path and loader, and written into
    checkpoints (`to_dict`)."""

    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.settings}
