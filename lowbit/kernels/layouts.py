"""Kernel-private layouts of the packed codes: the extension point for kernels that read
another arrangement faster than the canonical one (docs/FORMAT.md).

A layout converts a canonical `packed` tensor into its own arrangement and back,
exactly, and brings the `linear` that reads it. `QuantLinear.prepack(name)`
swaps a layer's codes into a layout in place (no second copy); its state_dict,
checkpoints and the reference keep seeing the canonical form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.errors import UsageError


@dataclass(frozen=True)
class Layout:
    """to_private(packed, bits) and to_canonical(private, bits) are exact inverses;
    linear(x, private, scales, zeros, bits, group_size, bias) computes what
    `lowbit.kernels.linear` computes on the canonical codes."""

    name: str
    to_private: Callable[[torch.Tensor, int], torch.Tensor]
    to_canonical: Callable[[torch.Tensor, int], torch.Tensor]
    linear: Callable[..., torch.Tensor]


LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    LAYOUTS[layout.name] = layout
    return layout


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise UsageError(f"lowbit: unknown layout {name!r}; known: {', '.join(sorted(LAYOUTS)) or 'none'}") from None
