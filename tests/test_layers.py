"""The package's layering: every module imports only from its own layer or below,
private names stay in their module, and the lowest layers load no compiled code."""

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import lowbit

PACKAGE = Path(lowbit.__file__).parent
# Bottom to top (lowbit/__init__.py, the architecture diagram, says the same).
LAYERS = [
    ("lowbit.errors", "lowbit.format", "lowbit._version"),
    ("lowbit.kernels", "lowbit._C"),
    ("lowbit.quant",),
    ("lowbit.nn",),
    ("lowbit.io",),
    ("lowbit.calib",),
    ("lowbit.eval",),
    ("lowbit.cli",),
    ("lowbit", "lowbit.__main__", "lowbit._moved"),  # the public API and the entry points
]


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific prefix naming `module`."""
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no layer"
    return best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lowbit_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every lowbit import, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "lowbit"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lowbit":
            names = [a.name for a in node.names]
            if node.module == "lowbit":  # `from lowbit import x`: x may be a submodule
                found += [(f"lowbit.{n}", [], node.lineno) for n in names]
            else:
                found.append((node.module, names, node.lineno))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert len(MODULES) > 30
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_only_from_its_layer_or_below(path):
    own = module_name(path)
    for imported, _, line in lowbit_imports(path):
        assert layer_of(imported) <= layer_of(own), (
            f"{own} (layer {LAYERS[layer_of(own)][0]}) imports {imported} from the layer above, "
            f"{LAYERS[layer_of(imported)][0]}, at line {line}")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_private_names_stay_in_their_module(path):
    for imported, names, line in lowbit_imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private or imported in ("lowbit._C",), f"line {line} imports {private} from {imported}"


def test_a_lower_layer_importing_a_higher_one_is_caught(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from lowbit.calib.config import QuantConfig\n")
    (imported, _, _), = lowbit_imports(bad)
    assert layer_of(imported) > layer_of("lowbit.nn.modules")


def test_config_and_format_load_without_the_compiled_kernels_or_transformers():
    code = (
        "import sys, lowbit.format, lowbit.calib.config, lowbit.quant.schemes; "
        "lowbit.format.check_bits(3); "
        "print(sorted(m for m in ('lowbit._C', 'transformers', 'lowbit.kernels.ops') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_old_module_paths_warn_and_give_the_new_modules():
    from lowbit.io import checkpoint

    with pytest.warns(DeprecationWarning, match="lowbit.checkpoint is now lowbit.io.checkpoint"):
        from lowbit.checkpoint import save_quantized  # noqa: F401  (the old path under test)
    assert save_quantized is checkpoint.save_quantized
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the public names import without a warning
        import lowbit.ops
    assert lowbit.ops.linear is lowbit.kernels.linear and callable(lowbit.ops.cpu_isa)
