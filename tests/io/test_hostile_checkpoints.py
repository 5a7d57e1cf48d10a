"""Hostile and careless checkpoints: every load path (load_quantized, from_pretrained after
`import lowbit`, load_gptq, checkpoint_info) refuses them with a CheckpointError naming the
file, key or tensor, in bounded time, reading nothing outside the checkpoint directory and
running none of its code."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from checkpoint_tools import quantized, rewrite_quant_config, rewrite_tensors
from safetensors.torch import load_file, save_file
from tiny import logits, tiny_llama, token_batch

import lowbit
from lowbit.errors import CheckpointError
from lowbit.io.checkpoint import load_quantized, load_tokenizer, save_quantized
from lowbit.io.gptq import export_gptq, load_gptq
from lowbit.io.info import checkpoint_info

ROOT = Path(__file__).resolve().parents[2]
UP = "model.layers.0.mlp.up_proj"


def from_pretrained(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path)


LOADERS = [load_quantized, from_pretrained]


@pytest.fixture
def saved(tmp_path, tiny_hf):
    """A lowbit checkpoint of a tiny Llama (untied embeddings) with a tokenizer, and its model."""
    model = quantized(tiny_llama(tie_word_embeddings=False))
    save_quantized(model, tmp_path / "ckpt", transformers.AutoTokenizer.from_pretrained(tiny_hf["model"]))
    return tmp_path / "ckpt", model


def rewrite_config(path, edit):
    file = Path(path) / "config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))


# --- 1. GPTQ dynamic patterns are data ---------------------------------------------------------


@pytest.fixture
def gptq_dir(tmp_path):
    model = quantized(tiny_llama())
    export_gptq(model, tmp_path / "gptq")
    return tmp_path / "gptq", model


def set_dynamic(path, dynamic):
    rewrite_config(path, lambda c: c["quantization_config"].update(dynamic=dynamic))
    (Path(path) / "quantize_config.json").unlink()


def test_a_catastrophic_dynamic_pattern_is_matched_in_bounded_time(gptq_dir):
    """`(.*)*x$` backtracks exponentially in `re`; it must neither hang nor change the load."""
    path, model = gptq_dir
    set_dynamic(path, {"-:(.*)*x$": {}, "+:((a|a)*)*b": {"bits": 2}})
    tokens = token_batch(model)
    torch.save({"tokens": tokens, "logits": logits(model, tokens)}, path.parent / "expected.pt")
    script = (
        "import torch, lowbit\n"
        f"m = lowbit.load_gptq({str(path)!r})\n"
        f"e = torch.load({str(path.parent / 'expected.pt')!r})\n"
        "with torch.no_grad(): assert torch.equal(m(e['tokens']).logits, e['logits'])\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120)


@pytest.mark.parametrize("dynamic, message", [
    ("-:.*", "must be an object of pattern -> settings"),
    (["-:.*"], "must be an object of pattern -> settings"),
    ({"-:(": {}}, "not a valid regular expression"),
    ({"+:(a)\\1": {}}, "backreferences"),
    ({"+:(?=model)": {}}, "lookarounds"),
    ({"+:(((a*)*)*)": {}}, "nested too deeply"),
    ({"+:.*": 5}, "must map a pattern to an object"),
    ({"+:.*": {"bits": "2"}}, "bits that is not an integer"),
    ({"+:.*": {"group_size": 32.0}}, "group_size that is not an integer"),
])
def test_bad_dynamic_tables_are_refused(gptq_dir, dynamic, message):
    path, _ = gptq_dir
    set_dynamic(path, dynamic)
    with pytest.raises(CheckpointError, match=message):
        load_gptq(path)


# --- 2. from_pretrained loads exactly what load_quantized loads --------------------------------


@pytest.mark.parametrize("key, dtype, message", [
    (f"{UP}.packed", torch.float32, "dtype torch.float32, expected torch.int32"),
    (f"{UP}.scales", torch.bfloat16, "dtype torch.bfloat16, expected torch.float16"),
    ("model.norm.weight", torch.uint32, "dtype torch.uint32, expected torch.float32"),
    ("model.embed_tokens.weight", torch.int32, "dtype torch.int32, expected torch.float32"),
])
@pytest.mark.parametrize("load", LOADERS)
def test_tensors_of_another_dtype_are_refused_not_cast(saved, load, key, dtype, message):
    path, _ = saved
    rewrite_tensors(path, lambda t: t.update({key: t[key].to(dtype)}))
    with pytest.raises(CheckpointError, match=rf"{key} has {message}"):
        load(path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["quantization_config"]["modules"].pop(UP), rf"holds tensors the model does not have, e\.g\. {UP}"),
    (lambda c: c.update(tie_word_embeddings=True), r"holds tensor lm_head\.weight, which the config ties"),
    (lambda c: c.update(num_hidden_layers=3), r"lacks tensor model\.layers\.2"),
    (lambda c: c.update(num_hidden_layers=1), "not a linear layer"),
])
@pytest.mark.parametrize("load", LOADERS)
def test_configs_that_contradict_the_tensors_never_load_random_layers(saved, load, edit, message):
    path, _ = saved
    rewrite_config(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load(path)


def test_an_untied_config_without_lm_head_is_refused(tmp_path):
    save_quantized(quantized(tiny_llama(tie_word_embeddings=True)), tmp_path / "ckpt")
    rewrite_config(tmp_path / "ckpt", lambda c: c.update(tie_word_embeddings=False))
    for load in LOADERS:
        with pytest.raises(CheckpointError, match=r"lacks tensor lm_head\.weight"):
            load(tmp_path / "ckpt")


@pytest.mark.parametrize("load", LOADERS)
def test_non_finite_full_precision_tensors_are_refused(saved, load):
    path, _ = saved
    rewrite_tensors(path, lambda t: t["model.embed_tokens.weight"].view(-1)[7].fill_(float("inf")))
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight contains NaN or Inf"):
        load(path)


def test_from_pretrained_loads_what_load_quantized_loads(saved):
    path, model = saved
    tokens = token_batch(model)
    a, b = load_quantized(path), from_pretrained(path)
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, t in a.state_dict().items():
        assert t.dtype == b.state_dict()[key].dtype and torch.equal(t, b.state_dict()[key]), key
    assert torch.equal(logits(a, tokens), logits(b, tokens))


# --- 3. containment -------------------------------------------------------------------------


def shard(tmp_path):
    model = quantized(tiny_llama())
    save_quantized(model, tmp_path / "ckpt", max_shard_size="40KB")
    path = tmp_path / "ckpt"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path, index


def write_index(path, index):
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["relative", "absolute"])
@pytest.mark.parametrize("load", [*LOADERS, checkpoint_info])
def test_index_entries_outside_the_directory_are_refused(tmp_path, where, load):
    path, index = shard(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(set(index["weight_map"].values()))[0]
    os.replace(path / first, outside / "x.safetensors")
    target = "../outside/x.safetensors" if where == "relative" else str(outside / "x.safetensors")
    index["weight_map"] = {k: (target if f == first else f) for k, f in index["weight_map"].items()}
    write_index(path, index)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        load(path)


@pytest.mark.parametrize("load", [*LOADERS, checkpoint_info])
def test_symlinks_leading_out_are_refused(tmp_path, load):
    path, index = shard(tmp_path)
    first = sorted(set(index["weight_map"].values()))[0]
    os.replace(path / first, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", path / first)
    with pytest.raises(CheckpointError, match="leads outside the checkpoint directory"):
        load(path)


def test_symlinks_inside_the_directory_and_into_the_hub_cache_are_followed(tmp_path):
    model = quantized(tiny_llama())
    tokens = token_batch(model)
    save_quantized(model, tmp_path / "ckpt")
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "rev").mkdir(parents=True)
    for f in (tmp_path / "ckpt").iterdir():
        os.replace(f, repo / "blobs" / f.name)
        os.symlink(f"../../blobs/{f.name}", repo / "snapshots" / "rev" / f.name)
    assert torch.equal(logits(load_quantized(repo / "snapshots" / "rev"), tokens), logits(model, tokens))


def test_a_symlink_loop_and_a_fifo_are_refused(saved):
    path, _ = saved
    (path / "config.json").unlink()
    os.symlink(path / "config.json", path / "config.json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_quantized(path)


@pytest.mark.parametrize("content", ["fifo", b"{not json", b"\xff\xfe\x00garbage"])
def test_a_corrupt_or_fifo_tokenizer_is_refused(saved, content):
    path, _ = saved
    (path / "tokenizer.json").unlink()
    if content == "fifo":
        os.mkfifo(path / "tokenizer.json")
    else:
        (path / "tokenizer.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_tokenizer(path)


# --- 4. no code from checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("load", [load_quantized, checkpoint_info, load_tokenizer])
def test_checkpoints_with_code_of_their_own_are_refused_without_running_it(saved, load, tmp_path):
    path, _ = saved
    marker = tmp_path / "ran"
    (path / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    auto_map = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model",
                "AutoTokenizer": ["custom.Tokenizer", None]}
    rewrite_config(path, lambda c: c.update(auto_map=auto_map))
    file = path / "tokenizer_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "auto_map": auto_map}))
    with pytest.raises(CheckpointError, match=r"auto_map.*never runs code"):
        load(path)
    assert not marker.exists()


def test_every_transformers_call_refuses_remote_code():
    """trust_remote_code=False on every AutoConfig / AutoTokenizer / AutoModel call lowbit makes."""
    import re

    calls = 0
    for file in (ROOT / "lowbit").rglob("*.py"):
        text = file.read_text()
        for call in re.finditer(r"(?<![`\w])Auto\w+\.(from_pretrained|from_config)\(", text):  # not in docs
            end = text.index("\n", call.end())
            arguments = text[call.end():end]
            if "gguf_file" in arguments:  # the pinned default model, converted once
                continue
            calls += 1
            assert "trust_remote_code=False" in arguments, f"{file}: {text[call.start():end]}"
    assert calls >= 5


# --- 5. malformed values: the checkpoint error, not a traceback ---------------------------------


@pytest.mark.parametrize("edit, message", [
    (lambda qc: qc["modules"][UP].update(bits=3.0), "bits must be 2, 3 or 4, got 3.0"),
    (lambda qc: qc["modules"][UP].update(bits=True), "bits must be 2, 3 or 4, got True"),
    (lambda qc: qc["modules"][UP].update(in_features=64.0), "in_features must be a positive multiple"),
    (lambda qc: qc["modules"][UP].update(group_size="64"), "group_size must be a multiple of 32"),
    (lambda qc: qc["modules"][UP].update(out_features=10**12), "out_features must be a positive integer"),
    (lambda qc: qc["modules"][UP].update(bias=0), "bias must be true or false"),
    (lambda qc: qc.update(modules_to_not_convert=5), "modules_to_not_convert must be a list"),
    (lambda qc: qc.update(overrides=5), "overrides must map patterns to settings"),
    (lambda qc: qc.update(overrides="abc"), "overrides must map patterns to settings"),
    (lambda qc: qc.update(method_config=[1, 2]), "method_config must be a JSON object"),
    (lambda qc: qc.update(method_config="rtn"), "method_config must be a JSON object"),
    (lambda qc: qc.update(method=5), "method must be a string"),
    (lambda qc: qc.update(bits="3"), "bits must be 2, 3 or 4"),
    (lambda qc: qc.update(format_version=2.0), "format_version is missing or not an integer"),
])
@pytest.mark.parametrize("load", [*LOADERS, checkpoint_info])
def test_malformed_quantization_configs(saved, load, edit, message):
    path, _ = saved
    rewrite_quant_config(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load(path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(quantization_config=[]), "quantization_config must be a JSON object"),
    (lambda c: c.update(dtype="bogus"), "dtype must be one of"),
    (lambda c: c.update(hidden_size="64"), "hidden_size must be an integer"),
    (lambda c: c.update(hidden_size=64.0), "hidden_size must be an integer"),
    (lambda c: c.update(rms_norm_eps="small"), "rms_norm_eps must be a number"),
    (lambda c: c.update(tie_word_embeddings=0), "tie_word_embeddings must be true or false"),
    (lambda c: c.update(vocab_size=10**12), r"vocab_size must be an integer in \[1, 16777216\]"),
    (lambda c: c.update(vocab_size=1e12), "vocab_size must be an integer"),
    (lambda c: c.update(num_hidden_layers=20000), "num_hidden_layers is 20000, but the checkpoint holds only"),
    (lambda c: c.update(intermediate_size=10**7), "intermediate_size is 10000000, more than the"),
    (lambda c: c.update(model_type="no-such-model"), "model_type 'no-such-model' is not a model type"),
    (lambda c: c.update(architectures="LlamaForCausalLM"), "architectures must be a list"),
])
def test_malformed_model_configs(saved, edit, message):
    path, _ = saved
    rewrite_config(path, edit)
    for load in (load_quantized, checkpoint_info):
        with pytest.raises(CheckpointError, match=message):
            load(path)


def test_huge_sizes_fail_fast_without_allocating(saved):
    """20000 layers or a vocabulary of 1e12 fail before anything is built."""
    path, _ = saved
    for edit in ({"num_hidden_layers": 20000}, {"vocab_size": 10**12}, {"vocab_size": 2**24}):
        rewrite_config(path, lambda c, edit=edit: c.update(edit))
        start = time.perf_counter()
        for load in LOADERS:
            with pytest.raises(CheckpointError):
                load(path)
        assert time.perf_counter() - start < 20


def test_non_utf8_and_oversized_config_files(saved):
    path, _ = saved
    (path / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(CheckpointError, match="config.json is not UTF-8"):
        load_quantized(path)
    (path / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(CheckpointError, match="config.json"):
        load_quantized(path)


def test_a_shard_holding_tensors_the_index_does_not_assign_is_refused(tmp_path):
    path, index = shard(tmp_path)
    first, second = sorted(set(index["weight_map"].values()))[:2]
    tensors = load_file(path / second)
    extra = next(k for k, f in index["weight_map"].items() if f == first)
    tensors[extra] = load_file(path / first)[extra] * 2
    save_file(tensors, path / second, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{second} holds tensor {extra}, which the index does not assign"):
        load_quantized(path)


def test_lowbit_loaders_agree_after_import_lowbit_alone(saved):
    """The refusals hold in a fresh interpreter where only `import lowbit` registered lowbit."""
    path, _ = saved
    rewrite_tensors(path, lambda t: t.update({f"{UP}.scales": t[f"{UP}.scales"].bfloat16()}))
    script = (
        "import lowbit, transformers\n"
        "from lowbit.errors import CheckpointError\n"
        "try:\n"
        f"    transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
        "except CheckpointError as e: print('refused:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "bfloat16" in done.stdout
    assert lowbit.load_tokenizer(saved[0]) is not None
