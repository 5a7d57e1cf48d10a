"""Clear refusals of bad lowbit checkpoints: missing, unexpected, misshapen or non-finite
tensors, contradicting or malformed quantization configs, truncated or missing files."""

import pytest
import torch
from checkpoint_tools import quantized, rewrite_quant_config, rewrite_tensors
from tiny import tiny_llama, tiny_opt

from lowbit.errors import CheckpointError
from lowbit.io.checkpoint import load_quantized, save_quantized


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
