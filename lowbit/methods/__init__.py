"""Calibration methods, by name. See `lowbit.methods.base.Method` to add one."""

from __future__ import annotations

from lowbit.methods.apiq import ApiQ
from lowbit.methods.base import LayerSpec, Method, Stage, derive_seed
from lowbit.methods.omniquant import OmniQuant
from lowbit.methods.rtn import RTN
from lowbit.methods.tesseraq import TesseraQ

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Makes a Method subclass available as `QuantConfig(method=cls.name)`."""
    if not cls.name:
        raise ValueError(f"lowbit: {cls.__name__} needs a `name`")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"lowbit: unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def saliency_methods() -> list[str]:
    """The registered methods that honour QuantConfig.saliency."""
    return sorted(name for name, cls in METHODS.items() if cls.uses_saliency)


for _cls in (RTN, OmniQuant, ApiQ, TesseraQ):
    register(_cls)

__all__ = ["METHODS", "LayerSpec", "Method", "Stage", "derive_seed", "get_method", "register", "saliency_methods"]
