"""Ordinary problems on the command line give one line and a non-zero status, never a
traceback (which `--debug` shows): full or read-only disks, text that is not UTF-8, empty
prompts and paths, `lowbit export .`, NaN models, tampered resume state, bad learning
rates, hostile checkpoints. The output is checked for writability before calibration."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from cli_tools import assert_one_line_error, quantize_args, run
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import lowbit
from lowbit import cli
from lowbit.io import files

READ_ONLY = Path("/sys/lowbit-test-output")  # sysfs refuses new entries, even to root


def writable(directory):
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def quick(tiny_hf, out, *extra):
    return quantize_args(tiny_hf, out, "--no-eval", "--no-bench", *extra)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_checkpoint(tiny_hf, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ckpt"
    assert run(quick(tiny_hf, out, "--method", "rtn"), capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"part")
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(files, "save_file", full_disk)
    code, _, err = run(quick(tiny_hf, out, "--method", "rtn", "--bits", "2"), capsys)
    assert_one_line_error(code, err, match=rf"cannot save {out}: No space left on device \(nothing was replaced\)")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.skipif(writable("/sys"), reason="needs a read-only /sys")
def test_an_unwritable_output_is_refused_before_calibration(tiny_hf, capsys):
    code, out, err = run(quick(tiny_hf, READ_ONLY), capsys)
    assert_one_line_error(code, err, match=r"--output /sys/lowbit-test-output: cannot write in /sys")
    assert "omniquant blocks" not in err and "calibration:" not in err  # nothing was calibrated


def test_an_output_below_a_file_is_refused_before_calibration(tiny_hf, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run(quick(tiny_hf, tmp_path / "file" / "out"), capsys)
    assert_one_line_error(code, err, match="is not a directory")
    assert "omniquant blocks" not in err


def test_non_utf8_texts_are_one_line(tiny_hf, tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait ".encode("latin-1") * 200)
    code, _, err = run(quick(tiny_hf, tmp_path / "out", "--calibration", str(bad)), capsys)
    assert_one_line_error(code, err, match=r"latin1.txt is not UTF-8 text \(invalid continuation byte at byte 3\)")
    code, _, err = run(["eval", str(tiny_checkpoint), "--data", str(bad)], capsys)
    assert_one_line_error(code, err, match="is not UTF-8 text")


def test_debug_shows_the_traceback(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"\xe9" * 100)
    with pytest.raises(lowbit.errors.UsageError, match="not UTF-8"):
        cli.main(["eval", str(tiny_checkpoint), "--data", str(bad), "--debug"])


def test_an_empty_prompt_is_one_line(tiny_checkpoint, capsys):
    code, _, err = run(["generate", str(tiny_checkpoint), "--prompt", ""], capsys)
    assert_one_line_error(code, err, match="--prompt '' gives no tokens")


@pytest.mark.parametrize("argv", [["quantize", "-o", ""], ["quantize", "--output", " "], ["export", "x", ""],
                                  ["quantize", "--resume", ""]])
def test_empty_paths_are_refused(argv, capsys):
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, 2, match="empty path")


def test_export_of_the_current_directory(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "mine"
    shutil.copytree(tiny_checkpoint, copy)
    monkeypatch.chdir(copy)
    code, out, err = run(["export", "."], capsys)
    assert code == 0, err
    assert lowbit.checkpoint_info(tmp_path / "mine-gptq")["method"] == "gptq"


@pytest.mark.parametrize("lr, status, match", [
    ("clip=-1", 2, "must be a finite number > 0"),
    ("clip=inf", 2, "must be a finite number > 0"),
    ("clip=nan", 2, "must be a finite number > 0"),
    ("clip=0", 2, "must be a finite number > 0"),
    ("rounding=0.1", 1, r"omniquant has no lr group 'rounding' \(its groups: clip\)"),
])
def test_bad_learning_rates_are_refused(tiny_hf, tmp_path, capsys, lr, status, match):
    code, _, err = run(quick(tiny_hf, tmp_path / "out", "--method", "omniquant", "--lr", lr), capsys)
    assert_one_line_error(code, err, status, match)
    assert not (tmp_path / "out").exists()


def test_a_nan_model_under_omniquant_is_one_line(tiny_hf, tmp_path, capsys):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf["model"])
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    transformers.AutoTokenizer.from_pretrained(tiny_hf["model"]).save_pretrained(tmp_path / "nan")
    args = quick(tiny_hf, tmp_path / "out")
    args[args.index("--model") + 1] = str(tmp_path / "nan")
    code, _, err = run(args, capsys)
    assert_one_line_error(code, err, match=r"up_proj[:.].*NaN or Inf")


def interrupted_resume_dir(tiny_hf, tmp_path, capsys, monkeypatch):
    """A resume directory holding block 0 of 2, from a run interrupted after it."""
    from lowbit.calib.resume import CheckpointStore

    real = CheckpointStore.save_block

    def save_then_interrupt(self, index, *args):
        real(self, index, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointStore, "save_block", save_then_interrupt)
    resume = tmp_path / "blocks"
    code, _, _ = run(quick(tiny_hf, tmp_path / "out", "--resume", str(resume)), capsys)
    assert code == 130
    monkeypatch.undo()
    return resume


def retag(file, **metadata):
    tensors = load_file(file)
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    save_file(tensors, file, metadata={**header.get("__metadata__", {}), **metadata})


@pytest.mark.parametrize("tamper, match", [
    (lambda d: retag(d / "streams.safetensors", finished_blocks="abc"), "finished_blocks is 'abc'"),
    (lambda d: retag(d / "streams.safetensors", finished_blocks="7"), "finished_blocks is '7'"),
    (lambda d: retag(d / "block_0000.safetensors", log="{not json"), "its log is not JSON"),
    (lambda d: retag(d / "block_0000.safetensors", log="[1, 2]"), "its log is not a JSON object"),
    (lambda d: retag(d / "block_0000.safetensors", log='{"bogus": 1}'), "does not hold block 0's state"),
    (lambda d: (d / "manifest.json").write_text("[]"), "manifest.json: not a JSON object"),
    (lambda d: (d / "block_0000.safetensors").write_bytes(b"\x00" * 9), "block_0000.safetensors"),
])
def test_tampered_resume_state_is_one_line(tiny_hf, tmp_path, capsys, monkeypatch, tamper, match):
    resume = interrupted_resume_dir(tiny_hf, tmp_path, capsys, monkeypatch)
    tamper(resume)
    code, _, err = run(quick(tiny_hf, tmp_path / "out", "--resume", str(resume)), capsys)
    assert_one_line_error(code, err, match=match)


def test_hostile_checkpoints_are_one_line_on_every_command(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    config = json.loads((bad / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom.Model"}
    (bad / "config.json").write_text(json.dumps(config))
    for argv in (["info", str(bad)], ["eval", str(bad)], ["generate", str(bad)], ["export", str(bad)]):
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, match="auto_map")


def test_non_finite_full_precision_tensors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.norm.weight"][5] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    for argv in (["eval", str(bad)], ["export", str(bad), str(tmp_path / "gptq")]):
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, match=r"model\.norm\.weight contains NaN or Inf")
    assert not (tmp_path / "gptq").exists()


def test_a_model_with_non_finite_weights_is_not_saved_or_exported(tiny_hf, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf["model"])
    lowbit.quantize_rtn(model, 3, 64)
    with torch.no_grad():
        model.model.norm.weight[2] = float("inf")
    for write in (lowbit.save_quantized, lowbit.export_gptq):
        with pytest.raises(lowbit.errors.UsageError, match=r"model\.norm\.weight contains NaN or Inf"):
            write(model, tmp_path / "out")
        assert not (tmp_path / "out").exists()
