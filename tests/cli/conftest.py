"""Fixtures of the command-line tests."""

import pytest
from cli_tools import quantize_args

from lowbit import cli


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_hf):
    """A checkpoint written by `lowbit quantize` (omniquant, 3-bit g64) on the tiny model."""
    out = tiny_hf["root"] / "w3g64"
    assert cli.main(quantize_args(tiny_hf, out, "--no-eval", "--no-bench")) == 0
    return out
