"""Calibration methods, by name. See `lowbit.calib.methods.base.Method` to add one."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lowbit.calib.methods.apiq import ApiQ
from lowbit.calib.methods.base import LayerSpec, Method, Stage
from lowbit.calib.methods.gptq import GPTQ
from lowbit.calib.methods.omniquant import OmniQuant
from lowbit.calib.methods.rtn import RTN
from lowbit.calib.methods.tesseraq import TesseraQ
from lowbit.errors import UsageError, UsageTypeError

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Makes a Method subclass available as `QuantConfig(method=cls.name)`."""
    if not cls.name:
        raise UsageError(f"lowbit: {cls.__name__} needs a `name`")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"lowbit: unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def methods_with_setting(setting: str) -> list[str]:
    """The registered methods that have `setting` among their own settings."""
    return sorted(name for name, cls in METHODS.items()
                  if cls.Settings is not None and setting in {f.name for f in dataclasses.fields(cls.Settings)})


def setting_default(method: str, setting: str) -> tuple[bool, Any]:
    """(True, the default) when `setting` is one of the method's `Settings`, else (False, None)."""
    settings = METHODS[method].Settings if method in METHODS else None
    for f in dataclasses.fields(settings) if settings is not None else ():
        if f.name == setting:
            return True, f.default
    return False, None


def check_method_settings(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` checked against the method's `Settings` (each checks its values);
    returned as a plain dict."""
    if not isinstance(options, Mapping):
        raise UsageTypeError(f"lowbit: options must be a dict of the method's settings, got {options!r}")
    settings = get_method(method).Settings
    if settings is None:
        return dict(options)
    known = {f.name for f in dataclasses.fields(settings)}
    for key in options:
        if key not in known:
            users = methods_with_setting(key)
            raise UsageError(f"lowbit: {method} does not use {key}"
                             + (f"; methods that do: {', '.join(users)}" if users else
                                f"; its settings are {', '.join(sorted(known)) or 'none'}"))
    settings(**options)  # checks the values
    return dict(options)


for _cls in (RTN, GPTQ, OmniQuant, ApiQ, TesseraQ):
    register(_cls)

__all__ = ["METHODS", "LayerSpec", "Method", "Stage", "check_method_settings", "get_method", "setting_default",
           "methods_with_setting", "register"]
