"""The packed format's rules: bit widths, the block size, and the checks of settings
and tensor metadata that follow from them (docs/FORMAT.md).

Pure Python on torch's dtypes: importing it never loads the compiled kernels, so
settings can be checked (and configs written) on a machine without them. The
kernels check the tensors they are given against the same rules
(csrc/include/lowbit/format.h).
"""

from __future__ import annotations

import torch

from lowbit.errors import UsageError, UsageTypeError

BLOCK = 32  # codes per packing block; in_features is a multiple of it
SUPPORTED_BITS = (2, 3, 4)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def is_int(value) -> bool:
    """An integer as settings and configs must give one: not a bool, not 3.0, not "3"."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_bits(bits: int) -> None:
    if not is_int(bits) or bits not in SUPPORTED_BITS:
        raise UsageError(f"lowbit: bits must be 2, 3 or 4, got {bits}")


def check_in_features(k: int) -> None:
    if not (is_int(k) and k > 0 and k % BLOCK == 0):
        raise UsageError(f"lowbit: in_features must be a positive multiple of 32, got {k}")


def check_group_size(group_size: int, k: int) -> None:
    if not (is_int(group_size) and group_size > 0 and group_size % BLOCK == 0 and k % group_size == 0):
        raise UsageError(
            f"lowbit: group_size must be a multiple of 32 that divides in_features ({k}), "
            f"got {group_size}"
        )


def check_group_size_setting(group_size: int | None, what: str = "group_size") -> None:
    """A group size as settings give it, before a layer's in_features is known."""
    if group_size is None or (is_int(group_size) and group_size == -1):
        return
    if not (is_int(group_size) and group_size > 0 and group_size % BLOCK == 0):
        raise UsageError(
            f"lowbit: {what} must be a positive multiple of {BLOCK}, -1 or None "
            f"(one group per row), got {group_size!r}"
        )


def resolve_group_size(group_size: int | None, in_features: int) -> int:
    """`None` or -1 mean one group per row (per-channel)."""
    return in_features if group_size in (None, -1) else int(group_size)


def check_float_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise UsageTypeError(f"lowbit: {what} must be float32, float16 or bfloat16, got {dtype}")


def words_per_row(k: int, bits: int) -> int:
    """int32 words holding one packed row of k codes."""
    return k // BLOCK * bits
