"""The quantization grid (round-to-nearest, scales, zeros, codes) and the per-layer
schemes that say which layer gets which bits and group size."""

from lowbit.quant.grid import rtn
from lowbit.quant.schemes import MethodSettings, Scheme, resolve_scheme

__all__ = ["MethodSettings", "Scheme", "resolve_scheme", "rtn"]
