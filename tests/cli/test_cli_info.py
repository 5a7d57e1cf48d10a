"""`lowbit info`: the summary of checkpoint_info, --json, and how errors are reported."""

import json
import re
import shutil

import pytest
from cli_tools import assert_one_line_error, run, save_variant

import lowbit
from lowbit import cli
from lowbit.io import info as io_info


def test_info_summarises_checkpoint_info(tiny_hf, tiny_checkpoint, tmp_path, capsys):
    code, out, err = run(["info", str(tiny_checkpoint)], capsys)
    assert code == 0, err
    expected = lowbit.checkpoint_info(tiny_checkpoint)
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert fields["format"] == "lowbit v2"
    assert fields["quantized"] == "14 linear layers: 3-bit g64 x14"
    assert fields["full precision"] == "lm_head"
    assert fields["method"].startswith("gptq (nsamples 2, seqlen 32, epochs 1, sw_weight 0.0")
    assert "e2e_epochs 2" in fields["method"]  # the default job's end-to-end stage
    assert fields["weights"] == f"{expected['weights_bytes'] / 1e6:.1f} MB in 1 file"
    assert fields["tokenizer"] == "saved"

    code, out, _ = run(["info", str(tiny_checkpoint), "--json"], capsys)
    assert code == 0 and json.loads(out) == json.loads(json.dumps(expected))

    mixed = tmp_path / "mixed"
    save_variant(tiny_hf, mixed, overrides={"down_proj": {"bits": 2}})
    code, out, _ = run(["info", str(mixed)], capsys)
    assert "14 linear layers: 3-bit g64 x12, 2-bit g64 x2" in out and "down_proj -> bits 2" in out

    code, out, _ = run(["info", tiny_hf["model"]], capsys)
    assert code == 0 and "full precision" in out


def test_info_refusals_and_unexpected_errors(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    code, _, err = run(["info", str(tmp_path / "missing")], capsys)
    assert_one_line_error(code, err, match="not a model directory")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (broken / "config.json").write_text(json.dumps(config))
    code, _, err = run(["info", str(broken)], capsys)
    assert_one_line_error(code, err, match="format_version 99 is not supported")
    # --debug shows the traceback of a user error; an unexpected error always keeps it.
    with pytest.raises(lowbit.CheckpointError):
        cli.main(["info", str(broken), "--debug"])

    def broken_reader(path):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(io_info, "checkpoint_info", broken_reader)
    with pytest.raises(RuntimeError, match="unexpected"):
        cli.main(["info", str(tiny_checkpoint)])
