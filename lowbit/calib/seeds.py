"""Seeds derived from the run's one seed, so that every random choice of a run (windows,
batch order, projections, initialisations) is reproducible and independent of the others."""

from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(seed: int, *parts: Any) -> int:
    """An independent 63-bit seed for each (seed, part, ...) combination."""
    text = repr((seed,) + parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1
