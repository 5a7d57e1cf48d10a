"""Module paths of earlier lowbit versions, kept importable for now.

`from lowbit.checkpoint import save_quantized` and the like still work: each old
path is the module at its new place, and importing it warns (DeprecationWarning)
with the new path. `lowbit.ops` and `lowbit.assets` are public names of
`lowbit.kernels` and `lowbit.io.assets` and import without a warning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

PUBLIC = {"lowbit.ops": "lowbit.kernels", "lowbit.assets": "lowbit.io.assets"}
MOVED = {
    "lowbit.reference": "lowbit.kernels.reference",
    "lowbit.quantizer": "lowbit.quant.grid",
    "lowbit.overrides": "lowbit.quant.schemes",
    "lowbit.permuted": "lowbit.nn.permuted",
    "lowbit.convert": "lowbit.nn.convert",
    "lowbit.checkpoint": "lowbit.io.checkpoint",
    "lowbit.gptq": "lowbit.io.gptq",
    "lowbit.hf": "lowbit.io.hf",
    "lowbit.config": "lowbit.calib.config",
    "lowbit.calibrate": "lowbit.calib.engine",
    "lowbit.blocks": "lowbit.calib.blocks",
    "lowbit.data": "lowbit.calib.data",
    "lowbit.losses": "lowbit.calib.losses",
    "lowbit.resume": "lowbit.calib.resume",
    "lowbit.saliency": "lowbit.calib.saliency",
    "lowbit.methods": "lowbit.calib.methods",
    "lowbit.methods.base": "lowbit.calib.methods.base",
    "lowbit.methods.lwc": "lowbit.calib.methods.lwc",
    "lowbit.methods.rtn": "lowbit.calib.methods.rtn",
    "lowbit.methods.omniquant": "lowbit.calib.methods.omniquant",
    "lowbit.methods.apiq": "lowbit.calib.methods.apiq",
    "lowbit.methods.tesseraq": "lowbit.calib.methods.tesseraq",
    "lowbit.evaluate": "lowbit.eval.perplexity",
    "lowbit.benchmark": "lowbit.eval.speed",
}


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module at its new place (which keeps its own spec)."""

    def __init__(self, new: str, warn: bool):
        self.new, self.warn = new, warn

    def create_module(self, spec):
        if self.warn:
            warnings.warn(f"{spec.name} is now {self.new}; import it from there", DeprecationWarning,
                          stacklevel=3)
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self.spec  # the import machinery replaced it by the alias's


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        new = PUBLIC.get(name) or MOVED.get(name)
        if new is None:
            return None
        return importlib.util.spec_from_loader(name, _Alias(new, warn=name in MOVED))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
