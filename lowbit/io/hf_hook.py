"""Registers lowbit with transformers when transformers' quantizer registry is imported.

Importing transformers' quantizers takes seconds, which `import lowbit` should
not cost users who never touch transformers. So the registration (`lowbit.io.hf`)
runs right after `transformers.quantizers.auto` is first imported, or at once if
it already is. Every `from_pretrained` imports that module before it looks a
quantization method up, so `import lowbit` is all a user needs.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

_REGISTRY = "transformers.quantizers.auto"


def _register() -> None:
    try:
        import lowbit.io.hf  # noqa: F401  (registers on import)
    except Exception as exc:  # never break transformers itself
        warnings.warn(f"lowbit: could not register with transformers: {exc!r}", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds the registry module with the other finders and runs `_register` after it executes."""

    def find_spec(self, name, path, target=None):
        if name != _REGISTRY:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            sys.meta_path.remove(self)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if _REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
