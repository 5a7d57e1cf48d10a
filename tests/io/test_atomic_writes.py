"""Atomic checkpoint writes (lowbit.io.files): an interrupted or killed save leaves the
old checkpoint as it was, and a save never replaces what is not a model directory."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_tools import quantized
from safetensors.torch import save_file
from tiny import logits, tiny_llama, tiny_opt, token_batch

from lowbit.io import files
from lowbit.io.checkpoint import load_quantized, save_quantized

ROOT = Path(__file__).resolve().parents[2]


def test_interrupted_save_leaves_nothing_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = quantized(tiny_opt())
    tokens = token_batch(model)
    save_quantized(model, tmp_path / "ckpt", max_shard_size="40KB")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    writes = []

    def crash_on_third_shard(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) == 3:
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(files, "save_file", crash_on_third_shard)
    other = quantized(tiny_opt(), 2)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(other, tmp_path / "ckpt", max_shard_size="40KB")
    with pytest.raises(OSError, match="disk full"):
        writes.clear()
        save_quantized(other, tmp_path / "new", max_shard_size="40KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or partial directory
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    monkeypatch.undo()
    assert torch.equal(logits(load_quantized(tmp_path / "ckpt"), tokens), logits(model, tokens))


def test_a_killed_save_never_leaves_a_half_written_checkpoint(tmp_path):
    """A process killed mid-write (no exception handling runs) leaves the old checkpoint
    as it was; only a hidden partial directory remains beside it."""
    save_quantized(quantized(tiny_opt()), tmp_path / "ckpt", max_shard_size="40KB")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    script = (
        "import os, sys, lowbit\n"
        "sys.path.insert(0, 'tests')\n"
        "from tiny import tiny_opt\n"
        "from lowbit.io import files\n"
        "real, calls = files.save_file, []\n"
        "def dying(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2: os._exit(3)\n"
        "    real(*args, **kwargs)\n"
        "files.save_file = dying\n"
        "model = tiny_opt(); lowbit.quantize_rtn(model, 2, 32)\n"
        f"lowbit.save_quantized(model, {str(tmp_path / 'ckpt')!r}, max_shard_size='40KB')\n"
    )
    assert subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=300).returncode == 3
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.partial-")


def test_saving_over_a_checkpoint_replaces_it(tmp_path):
    save_quantized(quantized(tiny_opt(), 4), tmp_path / "ckpt", max_shard_size="40KB")
    model = quantized(tiny_opt(), 2)
    save_quantized(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert not list((tmp_path / "ckpt").glob("model-0*"))  # old shards gone
    tokens = token_batch(model)
    assert torch.equal(logits(load_quantized(tmp_path / "ckpt"), tokens), logits(model, tokens))


def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a model directory"):
        save_quantized(quantized(tiny_llama()), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"


def test_save_refuses_a_model_without_quantized_layers(tmp_path):
    with pytest.raises(ValueError, match="no QuantLinear layers"):
        save_quantized(tiny_llama(), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
