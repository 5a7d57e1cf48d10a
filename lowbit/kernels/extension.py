"""The compiled extension, lowbit._C: importing it registers the kernels of the lowbit ops."""

try:
    from lowbit import _C as extension
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "lowbit's compiled kernels (lowbit._C) are missing or do not match this torch. "
        "Build them with `pip install --no-build-isolation -e .` in the lowbit checkout, "
        f"using the torch you run with. Original error: {exc}"
    ) from exc

__all__ = ["extension"]
