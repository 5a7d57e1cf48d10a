"""`lowbit export`: GPTQ export of a checkpoint, --dynamic, --merge-adapters, refusals."""

import json
import re

import torch
import transformers
from cli_tools import assert_one_line_error, run, save_variant

import lowbit
from lowbit.io.checkpoint import quant_modules
from lowbit.nn import QuantLinear


def test_export_gptq_then_import_gives_the_same_weights(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "gptq"
    code, stdout, err = run(["export", str(tiny_checkpoint), str(out), "--format", "gptq"], capsys)
    assert code == 0, err
    assert "gptq_v2, 3-bit group size 64, 14 layers" in stdout
    assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    ours, theirs = lowbit.load_quantized(tiny_checkpoint), lowbit.load_gptq(out)
    for name, layer in ours.named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(layer.dequantize(), theirs.get_submodule(name).dequantize()), name


def test_export_refusals(tiny_hf, tiny_checkpoint, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    save_variant(tiny_hf, mixed, overrides={"down_proj": {"bits": 2}})
    code, _, err = run(["export", str(mixed), str(tmp_path / "mixed-gptq")], capsys)
    assert_one_line_error(code, err, match=r"differ from 3-bit.*Pass --dynamic")
    assert not (tmp_path / "mixed-gptq").exists()
    code, _, err = run(["export", str(mixed), str(tmp_path / "mixed-gptq"), "--dynamic"], capsys)
    assert code == 0, err
    assert lowbit.checkpoint_info(tmp_path / "mixed-gptq")["format"] == "gptq_v2"  # default output name

    fractional = tmp_path / "fractional"
    save_variant(tiny_hf, fractional, fractional_zeros=True)
    code, _, err = run(["export", str(fractional)], capsys)
    assert_one_line_error(code, err, match=r"model.layers.0.mlp.up_proj.*zeros are not integers")
    assert not (tmp_path / "fractional-gptq").exists()

    code, _, err = run(["export", tiny_hf["model"]], capsys)
    assert_one_line_error(code, err, match="is a full precision model, not a lowbit checkpoint")
    code, _, err = run(["export", str(tiny_checkpoint), "--format", "awq"], capsys)
    assert_one_line_error(code, err, 2, match="invalid choice: 'awq'")


def test_export_of_an_adapted_checkpoint_needs_merge_adapters(tiny_hf, tmp_path, capsys):
    """A checkpoint with low-rank adapters (as apiq writes): `lowbit info` lists them, export
    refuses them, and --merge-adapters exports the merged codes."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf["model"])
    lowbit.quantize_rtn(model, 3, 64)
    for layer in model.model.layers[0].modules():
        if isinstance(layer, QuantLinear):
            layer.attach_adapter(8, B=torch.randn(layer.out_features, 8) * 0.01, dtype=torch.float16)
    lowbit.save_quantized(model, tmp_path / "adapted")
    code, out, err = run(["info", str(tmp_path / "adapted")], capsys)
    assert code == 0, err
    assert re.search(r"^adapters\s+7 layers: rank 8 float16 x7$", out, re.M)
    code, _, err = run(["export", str(tmp_path / "adapted")], capsys)
    assert_one_line_error(code, err, match=r"7 layers .* carry low-rank adapters.* with --merge-adapters")
    assert not (tmp_path / "adapted-gptq").exists()
    code, out, err = run(["export", str(tmp_path / "adapted"), "--merge-adapters"], capsys)
    assert code == 0, err
    assert "merged the low-rank adapters of 7 layers" in err + out
    imported = lowbit.load_gptq(tmp_path / "adapted-gptq")
    for name, layer in quant_modules(model).items():
        want = layer.merge_and_requantize() if layer.adapter is not None else layer
        assert torch.equal(imported.get_submodule(name).dequantize(), want.dequantize()), name
