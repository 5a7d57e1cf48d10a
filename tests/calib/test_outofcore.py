"""Out-of-core calibration of a model directory: the same checkpoint, byte for byte, as the
in-memory path; one block in memory at a time; resume; refusals of bad directories."""

import filecmp
import os
import shutil

import pytest
import torch
import transformers
from tiny import random_tokens, tiny_model

import lowbit
from lowbit.calib.outofcore import quantize_directory
from lowbit.calib.resume import CheckpointStore
from lowbit.calib.shards import ShardedWeights
from lowbit.errors import CheckpointError, UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

SHARD = "60KB"  # several shards for the tiny models, in and out


def config(**kw):
    return lowbit.QuantConfig(**{**dict(bits=3, group_size=32, nsamples=4, seqlen=32, epochs=1,
                                        lr={"clip": 0.1}, progress=False), **kw})


def save_directory(path, family="llama", **model_config):
    """A random model of `family` (fresh weights each test) saved in bf16 shards."""
    model = tiny_model(family, layers=3, seed=None, **model_config)
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size=SHARD)
    return path


def in_memory(source, output, cfg, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    lowbit.quantize(model, cfg, tokens)
    lowbit.save_quantized(model, output, max_shard_size=SHARD)


def assert_same_files(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and any(n.endswith(".safetensors") for n in names)
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.mark.parametrize("family,model_config,cfg", [
    ("llama", dict(tie_word_embeddings=True), {}),
    ("llama", dict(tie_word_embeddings=False), dict(skip=())),  # lm_head quantized round-to-nearest
    ("opt", {}, {}),
    ("llama", {}, dict(method="rtn", lr={})),
])
def test_out_of_core_checkpoint_is_the_in_memory_one(tmp_path, family, model_config, cfg):
    source = save_directory(tmp_path / "model", family, **model_config)
    tokens = random_tokens(4, 32, seed=int(torch.randint(1 << 30, ())))
    in_memory(source, tmp_path / "in-memory", config(**cfg), tokens)
    report = quantize_directory(source, tmp_path / "out-of-core", config(**cfg), tokens, max_shard_size=SHARD)
    assert_same_files(tmp_path / "in-memory", tmp_path / "out-of-core")
    assert report.peak_rss is None or report.peak_rss > 0
    assert len(report.blocks) == 3


def test_one_block_in_memory_at_a_time(tmp_path, monkeypatch):
    """When a block is loaded, every other block and the embeddings are on the meta device."""
    source = save_directory(tmp_path / "model")
    resident = []
    load_block = ShardedWeights.load_block

    def counting(self, index, block):
        blocks = self.model.get_submodule(self.prefix)
        resident.append(sum(any(not p.is_meta for p in b.parameters()) for b in blocks))
        resident.append(int(not self.model.get_input_embeddings().weight.is_meta))
        load_block(self, index, block)

    monkeypatch.setattr(ShardedWeights, "load_block", counting)
    quantize_directory(source, tmp_path / "out", config(), random_tokens(4, 32))
    assert len(resident) == 6 and max(resident) == 0


def test_in_memory_checkpoints_resume_out_of_core(tmp_path, monkeypatch):
    """A run stopped after block 0 (in memory) resumes out of core to the same checkpoint."""
    source = save_directory(tmp_path / "model")
    tokens = random_tokens(4, 32, seed=int(torch.randint(1 << 30, ())))
    cache = tmp_path / "cache"  # recorded in config.json: the same for both runs
    in_memory(source, tmp_path / "uninterrupted", config(cache_dir=str(cache)), tokens)
    shutil.rmtree(cache)
    save_block = CheckpointStore.save_block

    def save_then_stop(self, i, *args, **kw):
        save_block(self, i, *args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointStore, "save_block", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        in_memory(source, tmp_path / "never", config(cache_dir=str(cache)), tokens)
    monkeypatch.setattr(CheckpointStore, "save_block", save_block)
    report = quantize_directory(source, tmp_path / "resumed", config(cache_dir=str(cache)), tokens,
                                max_shard_size=SHARD)
    assert [b.resumed for b in report.blocks] == [True, False, False]
    assert_same_files(tmp_path / "uninterrupted", tmp_path / "resumed")


def test_bad_directories_are_refused_before_any_work(tmp_path):
    tokens = random_tokens(4, 32)
    out = tmp_path / "out"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    tiny_model("llama").config.save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="only PyTorch pickle files .*never unpickles"):
        quantize_directory(pickled, out, config(), tokens)

    source = save_directory(tmp_path / "model")
    shards = sorted(source.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        quantize_directory(source, out, config(), tokens)
    shards[1].unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        quantize_directory(source, out, config(), tokens)
    with pytest.raises(UsageError, match="needs output"):
        lowbit.quantize(str(source), config(), tokens)
    with pytest.raises(UsageError, match="saliency=True needs the whole model"):
        quantize_directory(source, out, config(method="apiq", saliency=True), tokens)
    assert not out.exists()


def test_a_quantized_checkpoint_is_not_a_source(tmp_path):
    source = save_directory(tmp_path / "model")
    tokens = random_tokens(4, 32)
    quantize_directory(source, tmp_path / "q", config(method="rtn", lr={}), tokens)
    with pytest.raises(UsageError, match="is a quantized checkpoint"):
        quantize_directory(tmp_path / "q", tmp_path / "again", config(), tokens)
