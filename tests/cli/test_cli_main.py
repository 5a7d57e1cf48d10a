"""The `lowbit` entry points: every command's --help and `python -m lowbit`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command, flags", [
    ([], ["quantize", "eval", "generate", "bench", "export", "info"]),
    (["quantize"], ["--model", "--bits", "--group-size", "--method", "--sw-weight", "--saliency",
                    "--calibration", "--nsamples", "--seqlen", "--epochs", "--device", "--seed", "--output",
                    "--resume", "--no-eval", "smollm2-135m-w3g64"]),
    (["eval"], ["--data", "--split", "--seqlen", "--max-windows", "wikitext2"]),
    (["generate"], ["--prompt", "--max-new-tokens", "--sample", "--temperature", "--chat"]),
    (["bench"], ["--shapes", "--m", "--bits", "--threads", "--rotate-mb"]),
    (["export"], ["--format", "--dynamic", "GPTQ v2"]),
    (["info"], ["--json"]),
])
def test_help(command, flags, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for flag in flags:
        assert flag in out, flag


def test_python_m_lowbit(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "lowbit", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0 and "quantize" in done.stdout
    done = subprocess.run([sys.executable, "-m", "lowbit", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"lowbit: error: {tmp_path / 'missing'} is not a model "
                                                "directory (no config.json)"]
