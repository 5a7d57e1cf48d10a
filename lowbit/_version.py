"""lowbit's version, read from the installed package's metadata (pyproject.toml is its one source)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lowbit")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

# The libraries a result depends on: perplexities change with tokenization details
# (transformers, tokenizers) and numerics (torch).
RESULT_LIBRARIES = ("lowbit", "torch", "transformers", "tokenizers")


def library_versions() -> dict[str, str]:
    """{name: installed version} of RESULT_LIBRARIES, for recording beside results."""
    return {name: library_version(name) for name in RESULT_LIBRARIES}


def library_version(name: str) -> str:
    if name == "lowbit":
        return __version__
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
