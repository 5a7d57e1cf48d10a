"""Calibration in two gloo processes on this machine: the same model as one process, per-block
checkpoints that either can resume, and clear stops for a dead rank and mismatched ranks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import random_tokens, tiny_model

import lowbit
from lowbit.calib.distributed import WindowShard, sum_over_ranks, sync_gradients
from lowbit.calib.resume import CheckpointStore

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
RANK_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(settings: dict, output: Path, world: int = 2, per_rank: dict | None = None) -> list:
    """Starts `world` workers as torchrun would and waits for all: [(exit status, stderr)]."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
        mine = {**settings, **(per_rank or {}).get(rank, {})}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(mine), str(output)], env=env,
                                      stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=RANK_TIMEOUT_S), p.stderr.read()) for p in procs]


def settings(tmp_path, **config) -> dict:
    seed = int.from_bytes(os.urandom(2), "little")
    base = dict(bits=3, group_size=32, nsamples=6, seqlen=32, epochs=2, batch_size=2, lr={"clip": 0.1},
                progress=False)
    return {"model": seed, "tokens_seed": seed + 1, "nsamples": 6, "config": {**base, **config}}


def single_process(s: dict, cache_dir=None) -> dict[str, torch.Tensor]:
    model = tiny_model("llama", layers=3, seed=s["model"])
    config = lowbit.QuantConfig(**{**s["config"], "cache_dir": cache_dir})
    lowbit.quantize(model, config, random_tokens(s["nsamples"], 32, seed=s["tokens_seed"]))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def code_agreement(a: dict, b: dict) -> float:
    packed = [k for k in a if k.endswith("packed")]
    assert packed and a.keys() == b.keys()
    return sum((a[k] == b[k]).sum().item() for k in packed) / sum(a[k].numel() for k in packed)


def assert_same_model(a: dict, b: dict) -> None:
    """Codes agree on at least 99.9 % of the weights; everything else within reduction error."""
    assert code_agreement(a, b) >= 0.999
    for k, t in a.items():
        if t.is_floating_point():
            torch.testing.assert_close(t, b[k], rtol=1e-2, atol=1e-3)


def test_two_processes_give_the_single_process_model(tmp_path):
    s = settings(tmp_path)
    results = run_ranks(s, tmp_path / "two.safetensors")
    assert all(code == 0 for code, _ in results), results
    assert_same_model(load_file(tmp_path / "two.safetensors"), single_process(s))


def test_checkpoints_of_a_dead_rank_resume_in_one_process_and_back(tmp_path):
    """Rank 1 dies in block 1: rank 0 stops with a one-line error; one process resumes
    from block 1. A single-process run stopped after block 0 resumes in two processes."""
    s = settings(tmp_path)
    cache = tmp_path / "from-two"
    s["config"]["cache_dir"] = str(cache)
    results = run_ranks({**s, "die_at_block": 1}, tmp_path / "never.safetensors")
    (code0, err0), (code1, _) = results
    assert code0 == 1 and code1 == 3
    assert "lost the other ranks" in err0 and "--resume" in err0
    assert sorted(p.name for p in cache.glob("block_*")) == ["block_0000.safetensors"]
    uninterrupted = single_process(s)
    assert_same_model(single_process(s, cache_dir=str(cache)), uninterrupted)

    cache = tmp_path / "from-one"
    save_block = CheckpointStore.save_block

    def save_then_stop(self, i, *args, **kw):
        save_block(self, i, *args, **kw)
        raise KeyboardInterrupt

    CheckpointStore.save_block = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            single_process(s, cache_dir=str(cache))
    finally:
        CheckpointStore.save_block = save_block
    s["config"]["cache_dir"] = str(cache)
    results = run_ranks(s, tmp_path / "resumed.safetensors")
    assert all(code == 0 for code, _ in results), results
    assert_same_model(load_file(tmp_path / "resumed.safetensors"), uninterrupted)


def test_mismatched_ranks_and_too_few_windows_are_refused(tmp_path):
    s = settings(tmp_path)
    results = run_ranks(s, tmp_path / "x.safetensors", per_rank={1: {"tokens_seed": s["tokens_seed"] + 1}})
    assert all(code == 1 for code, _ in results), results
    assert "rank 1 runs with other calibration data than rank 0" in results[0][1]
    s = {**settings(tmp_path), "nsamples": 1}
    s["config"]["nsamples"] = 1
    results = run_ranks(s, tmp_path / "x.safetensors")
    assert all(code == 1 for code, _ in results), results
    assert "2 processes but only 1 calibration windows" in results[0][1]


# --- the pieces, in one process ----------------------------------------------------------------


def test_window_shards_cover_every_window_once():
    total, world = int(torch.randint(5, 40, ())), int(torch.randint(2, 5, ()))
    shards = [WindowShard(r * total // world, (r + 1) * total // world, total) for r in range(world)]
    batch = torch.randperm(total)[: int(torch.randint(1, total + 1, ()))]
    picked = [shard.select(batch) for shard in shards]
    owned = torch.cat([local + shard.start for shard, (local, _) in zip(shards, picked)])
    assert sorted(owned.tolist()) == sorted(batch.tolist())
    assert sum(share for _, share in picked) == pytest.approx(1.0)


def test_outside_a_process_group_the_helpers_change_nothing():
    shard = WindowShard.of(7)
    batch = torch.randperm(7)[:3]
    assert shard.whole and shard.select(batch) == (batch, 1.0)
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    grad = p.grad.clone()
    sync_gradients(torch.optim.SGD([p], lr=0.1))
    assert torch.equal(p.grad, grad)
    values = {"loss": float(torch.rand(()))}
    assert sum_over_ranks(values) == values
