"""Out-of-core and two-process calibration of the real default model (SmolLM2-135M): the
same checkpoint and perplexity as the in-memory single-process run. Marked slow."""

import filecmp
import os

import pytest
import torch
from safetensors.torch import save_file
from test_distributed import run_ranks

import lowbit
from lowbit.calib.data import sample_windows, token_stream
from lowbit.errors import AssetError
from lowbit.eval.perplexity import token_perplexity
from lowbit.io import assets

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    try:
        directory = assets.smollm2_dir()
        texts = {split: assets.load_texts(name, split)
                 for name, split in [("sotu", "calibration"), ("wiki", "evaluation")]}
    except AssetError as exc:
        pytest.skip(f"the default model or texts are not available: {exc}")
    _, tokenizer = assets.load_model()
    return {"dir": directory, "calibration": token_stream(tokenizer, texts["calibration"]),
            "wiki": token_stream(tokenizer, texts["evaluation"])}


def perplexity(path, wiki):
    return token_perplexity(lowbit.load_quantized(path), wiki, 512, 4, progress=False)


def test_out_of_core_and_two_processes_match_the_in_memory_run(smollm2, tmp_path):
    seed = int(torch.randint(1 << 16, ()))
    tokens = sample_windows(smollm2["calibration"], 4, 256, seed=seed)
    settings = dict(bits=3, group_size=64, nsamples=4, seqlen=256, epochs=1, batch_size=2, lr={"clip": 0.1},
                    seed=seed, progress=False)
    model, _ = assets.load_model()
    lowbit.quantize(model, lowbit.QuantConfig(**settings), tokens)
    lowbit.save_quantized(model, tmp_path / "in-memory")
    del model
    lowbit.quantize(str(smollm2["dir"]), lowbit.QuantConfig(**settings), tokens, output=tmp_path / "out-of-core")
    for name in os.listdir(tmp_path / "in-memory"):
        if name.endswith((".safetensors", ".json")) and "tokenizer" not in name:
            assert filecmp.cmp(tmp_path / "in-memory" / name, tmp_path / "out-of-core" / name, shallow=False), name

    save_file({"tokens": tokens}, tmp_path / "tokens.safetensors")
    results = run_ranks({"model": str(smollm2["dir"]), "tokens_file": str(tmp_path / "tokens.safetensors"),
                         "config": settings}, tmp_path / "two")
    assert all(code == 0 for code, _ in results), results

    one = perplexity(tmp_path / "in-memory", smollm2["wiki"])
    assert perplexity(tmp_path / "out-of-core", smollm2["wiki"]) == one
    assert perplexity(tmp_path / "two", smollm2["wiki"]) == pytest.approx(one, rel=0.005)
