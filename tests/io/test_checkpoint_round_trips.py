"""lowbit checkpoints: save/load round trips, sharding, mixed precision, tokenizers,
checkpoint_info and loading onto a dtype."""

import json

import pytest
import torch
import transformers
from checkpoint_tools import assert_same_quant_layers, quantized
from safetensors.torch import load_file
from tiny import logits, tiny_llama, tiny_opt, token_batch

import lowbit
from lowbit.io.checkpoint import load_quantized, quant_modules, save_quantized

# --- mixed precision ---------------------------------------------------------------


def test_quantize_rtn_honours_overrides_and_records_settings():
    model = tiny_llama()
    overrides = {r"model\.layers\.1\.mlp\..*": {"bits": 2, "group_size": 64}, "o_proj": None}
    report = lowbit.quantize_rtn(model, 3, 32, overrides=overrides)
    layers = quant_modules(model)
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
