"""Atomic checkpoint writes (lowbit.io.files): an interrupted or killed save leaves the
old checkpoint as it was, and a save never replaces what is not a model directory."""

import os
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


# --- a kill at any point ----------------------------------------------------------------------


def snapshot(path):
    return {p.name: p.read_bytes() for p in path.iterdir()} if path.is_dir() else None


KILL_POINTS = ("save_file", "rename", "replace", "rmtree", "_exchange", "mkdir")


def _save_killed_at(point, model, path):
    """In a forked child: saves, dying (os._exit, no cleanup) at the `point`-th call of the file
    operations the save makes. Returns the child's exit status (7: killed, 0: finished first)."""
    pid = os.fork()
    if pid == 0:
        try:
            calls = [0]

            def dying(real):
                def wrapper(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == point:
                        os._exit(7)
                    return real(*args, **kwargs)
                return wrapper

            for name in KILL_POINTS:
                owner = {"rename": os, "replace": os, "mkdir": Path, "rmtree": files.shutil}.get(name, files)
                setattr(owner, name, dying(getattr(owner, name)))
            save_quantized(model, path, max_shard_size="40KB")
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_kill_at_any_point_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, exchange, one_thread):
    path = tmp_path / "ckpt"
    save_quantized(quantized(tiny_opt(), 4), path, max_shard_size="40KB")
    old = snapshot(path)
    new_model = quantized(tiny_opt(), 2)
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    outcomes = []
    for point in range(1, 40):
        status = _save_killed_at(point, new_model, path)
        assert status in (0, 7)
        now = snapshot(path)
        if exchange:
            assert now is not None, f"killed at file operation {point}: {path} is missing"
        if now is None:  # two renames, killed between them: the next save puts the old one back
            files.clean_leftovers(path)
            now = snapshot(path)
        assert now is not None
        outcomes.append("old" if now == old else "new")
        if now != old:  # then the whole new checkpoint
            assert load_quantized(path).model.decoder.layers[0].fc1.bits == 2
        files.clean_leftovers(path)
        assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # leftovers of the dead child are gone
        if status == 0:
            break
        if now != old:  # restore the old checkpoint for the next kill point
            save_quantized(quantized(tiny_opt(), 4), path, max_shard_size="40KB")
            old = snapshot(path)
    assert status == 0 and "old" in outcomes and outcomes[-1] == "new"


def test_leftovers_of_running_saves_are_kept(tmp_path):
    save_quantized(quantized(tiny_opt()), tmp_path / "ckpt")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = tmp_path / f".ckpt.partial-{alive.pid}-0123abcd"
        dead = tmp_path / ".ckpt.partial-999999999-0123abcd"
        legacy = tmp_path / ".ckpt.old-x1y2z3"
        for d in (mine, dead, legacy):
            d.mkdir()
        save_quantized(quantized(tiny_opt()), tmp_path / "ckpt")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", mine.name])
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_checkpoint_directories_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        save_quantized(quantized(tiny_opt()), tmp_path / "ckpt")
        save_quantized(quantized(tiny_opt()), tmp_path / "ckpt")  # the replacing path too
    finally:
        os.umask(previous)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "ckpt" / "config.json").stat().st_mode & 0o777 == mode & 0o666
