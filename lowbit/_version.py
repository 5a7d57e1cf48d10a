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
    versions = {}
    for name in RESULT_LIBRARIES:
        try:
            versions[name] = __version__ if name == "lowbit" else version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions
