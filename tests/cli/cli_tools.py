"""Running the `lowbit` command line in this process, and reading what it prints.

The tests run every command on the `tiny_hf` model directory (conftest.py) and
recompute the numbers the commands print through the Python API.
"""

import re
from pathlib import Path

import transformers

import lowbit
from lowbit import cli


def quantize_args(tiny_hf, output, *extra):
    """`lowbit quantize` of the tiny model on its own text, a budget of seconds."""
    text = tiny_hf["text"]
    return ["quantize", "--model", tiny_hf["model"], "--calibration", text, "--eval-data", text,
            "--nsamples", "2", "--seqlen", "32", "--epochs", "1", "--eval-seqlen", "32",
            "--eval-windows", "4", "--output", str(output), *extra]


def run(argv, capsys):
    """(exit status, stdout, stderr) of `lowbit argv` in this process; argparse exits count."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, expected_code=1, match=None):
    """A refusal: non-zero status, one error line (the last on stderr), no traceback."""
    assert code == expected_code
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    assert err.rstrip().splitlines()[-1] == error_lines[0]
    if match:
        assert re.search(match, error_lines[0]), error_lines[0]


def ppl(model, tiny_hf, seqlen=32, windows=4):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf["model"])
    return lowbit.perplexity(model, tokenizer, [Path(tiny_hf["text"]).read_text()], seqlen, windows, progress=False)


def cells(out, label):
    """The cells of the summary-table row starting with `label`."""
    for line in out.splitlines():
        if line.strip().startswith(label):
            return re.split(r"\s{2,}", line.strip())[1:]
    raise AssertionError(f"no {label!r} row in:\n{out}")


def save_variant(tiny_hf, path, overrides=None, fractional_zeros=False):
    """Saves the tiny model quantized by round-to-nearest (3-bit g64, with `overrides`);
    `fractional_zeros` makes one layer's zeros fractional, which GPTQ cannot hold."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf["model"])
    lowbit.quantize_rtn(model, 3, 64, overrides=overrides)
    if fractional_zeros:
        layer = model.model.layers[0].mlp.up_proj
        layer.zeros += 0.25
    lowbit.save_quantized(model, path, transformers.AutoTokenizer.from_pretrained(tiny_hf["model"]))
