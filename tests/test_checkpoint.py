"""lowbit checkpoints: save/load round trips, sharding, mixed precision, the transformers
`from_pretrained` path, atomic writes, and clear refusals of bad checkpoints."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from models import logits, tiny_llama, tiny_opt, token_batch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit import checkpoint
from lowbit.checkpoint import CheckpointError, load_quantized, save_quantized

ROOT = Path(__file__).resolve().parents[1]


def quantized(model, bits=3, group_size=32, **kwargs):
    lowbit.quantize_rtn(model, bits, group_size, **kwargs)
    return model


def assert_same_quant_layers(a, b):
    layers_a, layers_b = checkpoint.quant_modules(a), checkpoint.quant_modules(b)
    assert layers_a.keys() == layers_b.keys()
    for name, la in layers_a.items():
        lb = layers_b[name]
        assert type(la) is type(lb), name
        sa, sb = la.state_dict(), lb.state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{name}.{key}"


def rewrite_tensors(path, edit):
    """Applies `edit(dict)` to the tensors of a single-file checkpoint."""
    file = Path(path) / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def rewrite_quant_config(path, edit):
    file = Path(path) / "config.json"
    config = json.loads(file.read_text())
    edit(config["quantization_config"])
    file.write_text(json.dumps(config))


# --- mixed precision ---------------------------------------------------------------


def test_quantize_rtn_honours_overrides_and_records_settings():
    model = tiny_llama()
    overrides = {r"model\.layers\.1\.mlp\..*": {"bits": 2, "group_size": 64}, "o_proj": None}
    report = lowbit.quantize_rtn(model, 3, 32, overrides=overrides)
    layers = checkpoint.quant_modules(model)
    assert (layers["model.layers.1.mlp.up_proj"].bits, layers["model.layers.1.mlp.up_proj"].group_size) == (
        2,
        64,
    )
    assert (layers["model.layers.0.mlp.up_proj"].bits, layers["model.layers.0.mlp.up_proj"].group_size) == (
        3,
        32,
    )
    assert report.skipped["model.layers.0.self_attn.o_proj"] == "an override skips it"
    assert report.skipped["lm_head"] == "matches a skip pattern"
    recorded = model.lowbit_config.to_dict()
    assert recorded["method"] == "rtn" and recorded["bits"] == 3 and recorded["overrides"] == overrides


# --- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama-tied", "opt-bias"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_save_then_load_gives_identical_logits(tmp_path, make, bits):
    model = quantized(make(), bits)
    tokens = token_batch(model)
    expected = logits(model, tokens)
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    assert_same_quant_layers(model, loaded)
    assert torch.equal(logits(loaded, tokens), expected)
    assert not loaded.training


def test_tied_embeddings_are_stored_once_and_tied_again(tmp_path):
    model = quantized(tiny_llama(tie_word_embeddings=True))
    save_quantized(model, tmp_path / "ckpt")
    assert "lm_head.weight" not in load_file(tmp_path / "ckpt" / "model.safetensors")
    loaded = load_quantized(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_quantized_lm_head_of_a_tied_model_unties_it(tmp_path):
    model = quantized(tiny_llama(tie_word_embeddings=True), overrides={"lm_head": {"bits": 4}})
    assert isinstance(model.lm_head, lowbit.QuantLinear)
    tokens = token_batch(model)
    save_quantized(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = load_quantized(tmp_path / "ckpt")
    assert isinstance(loaded.lm_head, lowbit.QuantLinear)
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_mixed_precision_round_trip(tmp_path):
    overrides = {
        r"model\.layers\.0\.mlp\..*": {"bits": 4, "group_size": 64},
        "k_proj": {"bits": 2},
        "v_proj": None,
    }
    model = quantized(tiny_llama(), 3, 32, overrides=overrides)
    tokens = token_batch(model)
    save_quantized(model, tmp_path / "ckpt")
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qc["modules"]["model.layers.0.mlp.up_proj"]["bits"] == 4
    assert qc["modules"]["model.layers.0.mlp.up_proj"]["group_size"] == 64
    assert qc["modules"]["model.layers.1.self_attn.k_proj"]["bits"] == 2
    assert qc["modules"]["model.layers.1.mlp.up_proj"]["bits"] == 3
    assert "model.layers.1.self_attn.v_proj" in qc["modules_to_not_convert"]
    assert "model.layers.1.self_attn.v_proj" not in qc["modules"]
    assert qc["overrides"] == [[p, s] for p, s in overrides.items()]  # order kept
    assert (qc["bits"], qc["group_size"], qc["method"]) == (3, 32, "rtn")
    loaded = load_quantized(tmp_path / "ckpt")
    assert_same_quant_layers(model, loaded)
    assert isinstance(loaded.model.layers[1].self_attn.v_proj, torch.nn.Linear)
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_resaving_a_loaded_checkpoint_keeps_its_config(tmp_path):
    model = quantized(tiny_llama(), 3, 32, overrides={"k_proj": {"bits": 2}})
    save_quantized(model, tmp_path / "a")
    save_quantized(load_quantized(tmp_path / "a"), tmp_path / "b")
    qc_a, qc_b = (json.loads((tmp_path / d / "config.json").read_text())["quantization_config"] for d in "ab")
    assert qc_a == qc_b


def test_model_without_recorded_settings_derives_the_config(tmp_path):
    model = quantized(tiny_llama(), 4, 64)
    del model.lowbit_config
    save_quantized(model, tmp_path / "ckpt")
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["method"], qc["overrides"]) == (4, 64, None, [])


def test_sharded_checkpoint(tmp_path):
    model = quantized(tiny_opt())
    tokens = token_batch(model)
    save_quantized(model, tmp_path / "ckpt", max_shard_size="40KB")
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    stored = {}
    for f in files:
        shard = load_file(tmp_path / "ckpt" / f)
        nbytes = sum(t.numel() * t.element_size() for t in shard.values())
        assert nbytes <= 40_000 or len(shard) == 1  # a tensor over the limit gets a shard of its own
        stored.update(shard)
    assert set(stored) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert torch.equal(logits(load_quantized(tmp_path / "ckpt"), tokens), logits(model, tokens))


def test_tokenizer_is_saved_beside_the_weights(tmp_path):
    model = quantized(tiny_llama())
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_word_level_tokenizer(), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    save_quantized(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()
    loaded = lowbit.load_tokenizer(tmp_path / "ckpt")
    assert loaded("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    save_quantized(model, tmp_path / "bare")
    assert lowbit.load_tokenizer(tmp_path / "bare") is None


def _word_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_checkpoint_info(tmp_path):
    model = quantized(tiny_llama(), 3, 32, overrides={"k_proj": {"bits": 2}, "v_proj": None})
    save_quantized(model, tmp_path / "ckpt")
    info = lowbit.checkpoint_info(tmp_path / "ckpt")
    assert (
        info["format"] == "lowbit v2"
        and info["method"] == "rtn"
        and info["architecture"] == "LlamaForCausalLM"
    )
    assert info["schemes"] == {"3-bit g32": 10, "2-bit g32": 2} and info["quantized_modules"] == 12
    assert set(info["full_precision_modules"]) == {
        "lm_head",
        *(f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)),
    }
    assert info["weights_bytes"] == (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    assert info["tokenizer"] is False
    lowbit.export_gptq(quantized(tiny_llama(), 4, 64), tmp_path / "gptq")
    gptq_info = lowbit.checkpoint_info(tmp_path / "gptq")
    assert (gptq_info["format"], gptq_info["bits"], gptq_info["quantized_modules"]) == ("gptq_v2", 4, 14)
    tiny_llama().save_pretrained(tmp_path / "plain")
    assert lowbit.checkpoint_info(tmp_path / "plain")["format"] == "full precision"


def test_load_onto_a_dtype(tmp_path):
    model = quantized(tiny_llama())
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.up_proj.scales.dtype == torch.float16  # stored scales kept
    out = logits(loaded, token_batch(model))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --- low-rank adapters (apiq) --------------------------------------------------------

QP = "model.layers.0.self_attn.q_proj"  # adapter rank 4, float32


def with_adapters(model, dtypes=(torch.float32, torch.float16, torch.bfloat16), rank=4):
    """Random adapters with non-zero B on every other quantized layer, cycling through `dtypes`
    and ranks rank, rank + 1, ...; the other layers stay plain."""
    gen = torch.Generator().manual_seed(0)
    for i, (name, layer) in enumerate(checkpoint.quant_modules(model).items()):
        if i % 2:
            continue
        r, dtype = rank + i % 3, dtypes[(i // 2) % len(dtypes)]
        A = torch.randn(r, layer.in_features, generator=gen) / layer.in_features**0.5
        B = torch.randn(layer.out_features, r, generator=gen) * 0.1
        layer.attach_adapter(r, 2.0 * r + i, A=A, B=B, dtype=dtype)
    return model


def adapter_specs(model):
    return {name: {"rank": m.adapter.rank, "dtype": str(m.adapter.A.dtype).removeprefix("torch.")}
            for name, m in checkpoint.quant_modules(model).items() if m.adapter is not None}


@pytest.fixture
def adapted(tmp_path):
    """(model with adapters on every other layer, its checkpoint directory)."""
    model = with_adapters(quantized(tiny_llama(), 3, 32))
    save_quantized(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_adapters_round_trip_exactly(adapted):
    model, path = adapted
    tokens = token_batch(model)
    expected = logits(model, tokens)
    plain = logits(quantized(tiny_llama(), 3, 32), tokens)
    assert not torch.allclose(expected, plain)  # the adapters change the output
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == checkpoint.FORMAT_VERSION == 2
    stored = {name: spec["adapter"] for name, spec in qc["modules"].items() if "adapter" in spec}
    assert stored == adapter_specs(model) and len(stored) == 7
    assert {s["dtype"] for s in stored.values()} == {"float32", "float16", "bfloat16"}
    for loaded in (load_quantized(path), transformers.AutoModelForCausalLM.from_pretrained(path)):
        assert_same_quant_layers(model, loaded)  # includes adapter.A, adapter.B, adapter.scale
        assert adapter_specs(loaded) == adapter_specs(model)
        assert torch.equal(logits(loaded, tokens), expected)
    info = lowbit.checkpoint_info(path)
    assert info["format"] == "lowbit v2" and sum(info["adapters"].values()) == 7
    assert info["adapters"]["rank 4 float32"] == 3  # layers 0, 6 and 12


def test_apiq_model_round_trips_through_a_checkpoint(tmp_path):
    """The real path: lowbit.quantize with method="apiq" keeps adapters, and save -> load
    (both loaders) rebuilds them exactly."""
    model = tiny_llama(layers=1)
    tokens = token_batch(model, 2, 16)
    config = lowbit.QuantConfig(method="apiq", bits=2, group_size=32, epochs=1, lora_rank=4, progress=False)
    lowbit.quantize(model, config, tokens)
    assert all(m.adapter is not None and m.adapter.B.abs().sum() > 0
               for m in checkpoint.quant_modules(model).values())
    expected = logits(model, tokens)
    save_quantized(model, tmp_path / "ckpt")
    for loaded in (load_quantized(tmp_path / "ckpt"),
                   transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")):
        assert_same_quant_layers(model, loaded)
        assert torch.equal(logits(loaded, tokens), expected)
        assert loaded.lowbit_config.method == "apiq" and loaded.lowbit_config.settings["lora_rank"] == 4


@pytest.mark.parametrize("tensor", ["adapter.A", "adapter.B", "adapter.scale"])
def test_missing_adapter_tensor(adapted, tensor):
    _, path = adapted
    rewrite_tensors(path, lambda t: t.pop(f"{QP}.{tensor}"))
    message = rf"lacks tensor {re.escape(QP)}\.{re.escape(tensor)}"
    with pytest.raises(CheckpointError, match=message + r" for the quantized module .*adapter rank 4"):
        load_quantized(path)
    with pytest.raises(CheckpointError, match=message):
        transformers.AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("tensor, shape", [("adapter.A", [5, 64]), ("adapter.B", [64, 3]),
                                           ("adapter.scale", [1])])
def test_adapter_tensor_of_the_wrong_shape(adapted, tensor, shape):
    _, path = adapted
    key = f"{QP}.{tensor}"
    rewrite_tensors(path, lambda t: t.update({key: torch.ones(shape, dtype=t[key].dtype)}))
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)} has shape {re.escape(str(shape))}"):
        load_quantized(path)
    # transformers' own size check (its load report, logged just before, names the tensor)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(path)


def test_adapter_tensor_of_the_wrong_dtype_or_not_finite(adapted):
    _, path = adapted
    key = f"{QP}.adapter.B"
    rewrite_tensors(path, lambda t: t.update({key: t[key].half()}))
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)} has dtype torch.float16, expected torch.float32"):
        load_quantized(path)
    rewrite_tensors(path, lambda t: t.update({key: t[key].float().index_fill(0, torch.tensor([2]), float("inf"))}))
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)} contains NaN"):
        load_quantized(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda a: a.update(rank=5), r"adapter\.A has shape \[4, 64\], expected \[5, 64\]"),
        (lambda a: a.update(rank=0), "rank must be a positive integer"),
        (lambda a: a.update(dtype="int8"), r"adapter\.dtype must be one of"),
        (lambda a: a.update(alpha=8), "exactly the keys 'rank' and 'dtype'"),
    ],
)
def test_adapter_entry_contradicting_or_malformed(adapted, edit, message):
    _, path = adapted
    rewrite_quant_config(path, lambda qc: edit(qc["modules"][QP]["adapter"]))
    with pytest.raises(CheckpointError, match=message):
        load_quantized(path)


def test_format_version_1_is_still_read_but_cannot_hold_adapters(adapted, tmp_path):
    model = quantized(tiny_llama())
    save_quantized(model, tmp_path / "v1")
    rewrite_quant_config(tmp_path / "v1", lambda qc: qc.update(format_version=1))
    tokens = token_batch(model)
    assert torch.equal(logits(load_quantized(tmp_path / "v1"), tokens), logits(model, tokens))
    assert lowbit.checkpoint_info(tmp_path / "v1")["format"] == "lowbit v1"
    _, path = adapted
    rewrite_quant_config(path, lambda qc: qc.update(format_version=1))
    with pytest.raises(CheckpointError, match="unknown field 'adapter' .it needs format_version 2"):
        load_quantized(path)


def test_gptq_export_refuses_adapters_until_they_are_merged(adapted, tmp_path):
    model, _ = adapted
    with pytest.raises(ValueError, match=r"7 layers .* carry low-rank adapters.*lowbit\.merge_adapters"):
        lowbit.export_gptq(model, tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()
    expected = {name: m.merge_and_requantize().dequantize() for name, m in checkpoint.quant_modules(model).items()
                if m.adapter is not None}
    merged = lowbit.merge_adapters(model)
    assert sorted(merged) == sorted(expected)
    assert all(m.adapter is None for m in checkpoint.quant_modules(model).values())
    lowbit.export_gptq(model, tmp_path / "gptq")
    imported = lowbit.load_gptq(tmp_path / "gptq")
    for name, weight in expected.items():
        assert torch.equal(imported.get_submodule(name).dequantize(), weight), name


# --- transformers from_pretrained ----------------------------------------------------


def test_from_pretrained_matches_load_quantized(tmp_path):
    model = quantized(tiny_opt(), 3, 32, overrides={"fc1": {"bits": 2}})
    tokens = token_batch(model)
    save_quantized(model, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert_same_quant_layers(model, hf)
    assert torch.equal(logits(hf, tokens), logits(model, tokens))
    assert hf.lowbit_config.method == "rtn"


def test_from_pretrained_refuses_missing_and_nan_tensors(tmp_path):
    save_quantized(quantized(tiny_llama()), tmp_path / "ckpt")
    rewrite_tensors(tmp_path / "ckpt", lambda t: t.pop("model.layers.0.mlp.up_proj.zeros"))
    with pytest.raises(CheckpointError, match=r"lacks tensor model\.layers\.0\.mlp\.up_proj\.zeros"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    save_quantized(quantized(tiny_llama()), tmp_path / "ckpt")
    rewrite_tensors(
        tmp_path / "ckpt", lambda t: t["model.layers.1.mlp.down_proj.scales"].view(-1)[5].fill_(float("nan"))
    )
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.scales contains NaN"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_import_lowbit_alone_registers_with_transformers(tmp_path):
    """In a fresh interpreter: `import lowbit` must not import transformers, yet
    from_pretrained must find the lowbit quantizer afterwards."""
    model = quantized(tiny_llama())
    tokens = token_batch(model)
    save_quantized(model, tmp_path / "ckpt")
    torch.save({"tokens": tokens, "logits": logits(model, tokens)}, tmp_path / "expected.pt")
    script = (
        "import sys, torch, lowbit\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad(): assert torch.equal(m(e['tokens']).logits, e['logits'])\n"
        "assert type(m.model.layers[0].mlp.up_proj).__name__ == 'QuantLinear'\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=300)


# --- atomic writes -------------------------------------------------------------------


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

    monkeypatch.setattr(checkpoint, "save_file", crash_on_third_shard)
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
        "from models import tiny_opt\n"
        "from lowbit import checkpoint\n"
        "real, calls = checkpoint.save_file, []\n"
        "def dying(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2: os._exit(3)\n"
        "    real(*args, **kwargs)\n"
        "checkpoint.save_file = dying\n"
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


# --- refusals of bad checkpoints -----------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = quantized(tiny_opt())
    save_quantized(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_tensor(saved):
    rewrite_tensors(saved, lambda t: t.pop("model.decoder.layers.1.fc2.scales"))
    with pytest.raises(
        CheckpointError, match=r"lacks tensor model\.decoder\.layers\.1\.fc2\.scales .*bits=3"
    ):
        load_quantized(saved)


def test_missing_full_precision_tensor(saved):
    rewrite_tensors(saved, lambda t: t.pop("model.decoder.final_layer_norm.weight"))
    with pytest.raises(CheckpointError, match=r"lacks tensor model\.decoder\.final_layer_norm\.weight"):
        load_quantized(saved)


def test_unexpected_tensor(saved):
    rewrite_tensors(saved, lambda t: t.update({"model.decoder.layers.0.fc1.lora_A": torch.ones(2, 2)}))
    with pytest.raises(CheckpointError, match=r"model\.decoder\.layers\.0\.fc1\.lora_A"):
        load_quantized(saved)


def test_wrong_shape(saved):
    key = "model.decoder.layers.0.fc1.packed"
    rewrite_tensors(saved, lambda t: t.update({key: t[key][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"{key} has shape \[128, 5\], expected \[128, 6\]"):
        load_quantized(saved)


def test_wrong_dtype_of_a_quantized_tensor(saved):
    key = "model.decoder.layers.0.fc1.scales"
    rewrite_tensors(saved, lambda t: t.update({key: t[key].float()}))
    with pytest.raises(CheckpointError, match=rf"{key} has dtype torch.float32, expected torch.float16"):
        load_quantized(saved)


def test_nan_scales(saved):
    key = "model.decoder.layers.1.self_attn.q_proj.scales"
    rewrite_tensors(saved, lambda t: t[key].view(-1)[3].fill_(float("nan")))
    with pytest.raises(CheckpointError, match=rf"{key} contains NaN"):
        load_quantized(saved)


@pytest.mark.parametrize(
    "version, message", [(3, "newer lowbit"), (0, "not supported"), ("2", "not an integer")]
)
def test_unknown_format_version(saved, version, message):
    rewrite_quant_config(saved, lambda qc: qc.update(format_version=version))
    with pytest.raises(CheckpointError, match=message):
        load_quantized(saved)


def test_config_contradicting_the_tensors(saved):
    name = "model.decoder.layers.0.fc2"
    rewrite_quant_config(saved, lambda qc: qc["modules"][name].update(bits=2))
    with pytest.raises(CheckpointError, match=rf"{name}\.packed has shape .*bits=2"):
        load_quantized(saved)


FC1 = "model.decoder.layers.0.fc1"


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda qc: qc["modules"].update({"model.decoder.nothing": dict(qc["modules"][FC1])}),
            "not a linear layer",
        ),
        (lambda qc: qc["modules"][FC1].update(in_features=128), "in_features=128"),
        (lambda qc: qc["modules"][FC1].update(bias=False), "bias=False"),
        (lambda qc: qc["modules"][FC1].update(rank=8), "unknown field 'rank'"),
        (lambda qc: qc["modules"][FC1].pop("dtype"), "lacks 'dtype'"),
        (lambda qc: qc["modules"][FC1].update(group_size=48), "group_size"),
        (lambda qc: qc["modules_to_not_convert"].append(FC1), "both as quantized"),
        (lambda qc: qc.update(overrides=[["(", None]]), "regular expression"),
        (lambda qc: qc.update(quant_method="gptq"), "use lowbit.load_gptq"),
        (lambda qc: qc.pop("modules"), "modules must be a non-empty table"),
    ],
)
def test_inconsistent_quantization_config(saved, edit, message):
    rewrite_quant_config(saved, edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(saved)


@pytest.mark.parametrize("keep", [0, 7, 100, -40])
def test_truncated_safetensors(saved, keep):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        load_quantized(saved)


def test_missing_shard_and_missing_files(tmp_path):
    save_quantized(quantized(tiny_opt()), tmp_path / "ckpt", max_shard_size="40KB")
    second = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(CheckpointError, match=rf"{second.name} is missing"):
        load_quantized(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_quantized(tmp_path / "nowhere")
    (tmp_path / "ckpt" / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_quantized(tmp_path / "ckpt")


def test_checkpoint_without_quantization_config(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="missing: not a quantized checkpoint"):
        load_quantized(tmp_path / "plain")
