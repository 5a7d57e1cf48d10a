"""`lowbit eval`: the perplexity of a checkpoint or a full-precision model, and refusals."""

import re
import shutil

import pytest
import transformers
from cli_tools import assert_one_line_error, ppl, run

import lowbit


def test_eval_of_checkpoint_and_full_precision_model(tiny_hf, tiny_checkpoint, capsys):
    for source, model in [(str(tiny_checkpoint), lowbit.load_quantized(tiny_checkpoint)),
                          (tiny_hf["model"], transformers.AutoModelForCausalLM.from_pretrained(tiny_hf["model"]))]:
        code, out, err = run(["eval", source, "--data", tiny_hf["text"], "--seqlen", "48", "--max-windows", "3"],
                             capsys)
        assert code == 0, err
        printed = float(re.search(r"perplexity (\S+)", out).group(1))
        assert printed == pytest.approx(ppl(model, tiny_hf, 48, 3), abs=0.0006)
        assert "3 windows x 48 tokens (141 predicted tokens)" in out


def test_eval_refusals(tiny_hf, tiny_checkpoint, tmp_path, capsys):
    code, _, err = run(["eval", str(tmp_path / "missing")], capsys)
    assert_one_line_error(code, err, match="no such model directory")
    code, _, err = run(["eval", str(tiny_checkpoint), "--data", str(tmp_path / "missing.txt")], capsys)
    assert_one_line_error(code, err, match="unknown text source")
    code, _, err = run(["eval", str(tiny_checkpoint), "--data", tiny_hf["text"], "--seqlen", "100000"], capsys)
    assert_one_line_error(code, err, match="fewer than one window")

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run(["eval", str(truncated), "--data", tiny_hf["text"]], capsys)
    assert_one_line_error(code, err, match="corrupt or truncated")

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_checkpoint, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    code, _, err = run(["eval", str(no_tokenizer), "--data", tiny_hf["text"]], capsys)
    assert_one_line_error(code, err, match="no tokenizer files; name one with --tokenizer")
    code, out, err = run(["eval", str(no_tokenizer), "--data", tiny_hf["text"], "--tokenizer", tiny_hf["model"],
                          "--seqlen", "32", "--max-windows", "2"], capsys)
    assert code == 0 and "perplexity" in out, err
