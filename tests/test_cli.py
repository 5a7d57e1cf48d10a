"""The `lowbit` command line, end to end.

Fast tests run every command on a tiny random Llama saved as a Hugging Face
directory with a byte-level BPE tokenizer trained here (offline, in milliseconds)
and a text file; numbers the commands print are recomputed through the Python API.
The slow test runs the real default `lowbit quantize` with a reduced budget.
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import lowbit
from lowbit import assets, cli
from lowbit.data import token_stream
from lowbit.methods import METHODS, register
from lowbit.methods.rtn import RTN
from lowbit.nn import QuantLinear

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there one all we their river city north old new").split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"model": HF directory of a 2-block random Llama with its tokenizer, "text": a text file}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) + "."
                       for _ in range(150))
    (root / "text.txt").write_text(text)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"],
        show_progress=False))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return {"model": str(root / "model"), "text": str(root / "text.txt"), "root": root}


def quantize_args(tiny, output, *extra):
    return ["quantize", "--model", tiny["model"], "--calibration", tiny["text"], "--eval-data", tiny["text"],
            "--nsamples", "2", "--seqlen", "32", "--epochs", "1", "--eval-seqlen", "32",
            "--eval-windows", "4", "--output", str(output), *extra]


@pytest.fixture(scope="module")
def checkpoint(tiny):
    """A checkpoint written by `lowbit quantize` (omniquant, 3-bit g64) on the tiny model."""
    out = tiny["root"] / "w3g64"
    assert cli.main(quantize_args(tiny, out, "--no-eval", "--no-bench")) == 0
    return out


def run(argv, capsys):
    """(exit status, stdout, stderr) of `lowbit argv` in this process; argparse exits count."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, expected_code=1, match=None):
    """A refusal: non-zero status, one error line (the last on stderr), no traceback."""
    assert code == expected_code
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    assert err.rstrip().splitlines()[-1] == error_lines[0]
    if match:
        assert re.search(match, error_lines[0]), error_lines[0]


def ppl(model, tiny, seqlen=32, windows=4):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["model"])
    return lowbit.perplexity(model, tokenizer, [Path(tiny["text"]).read_text()], seqlen, windows, progress=False)


def cells(out, label):
    """The cells of the summary-table row starting with `label`."""
    for line in out.splitlines():
        if line.strip().startswith(label):
            return re.split(r"\s{2,}", line.strip())[1:]
    raise AssertionError(f"no {label!r} row in:\n{out}")


# --- quantize ------------------------------------------------------------------------------


def test_quantize_prints_the_summary_of_what_it_saved(tiny, tmp_path, capsys):
    out = tmp_path / "ckpt"
    code, stdout, err = run(quantize_args(tiny, out), capsys)
    assert code == 0, err

    info = lowbit.checkpoint_info(out)
    assert info["format"] == "lowbit v2" and info["method"] == "omniquant"
    assert info["quantized_modules"] == 14 and info["schemes"] == {"3-bit g64": 14}
    assert info["full_precision_modules"] == ["lm_head"] and info["tokenizer"]
    assert info["method_config"]["nsamples"] == 2 and info["method_config"]["lr"] == {"clip": 0.1}

    size = cells(stdout, "size (MB)")
    fp_bytes = (Path(tiny["model"]) / "model.safetensors").stat().st_size
    assert size[:2] == [f"{fp_bytes / 1e6:.1f}", f"{info['weights_bytes'] / 1e6:.1f}"]
    # The printed perplexities are those of the original model and of the saved checkpoint.
    fp_model = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"])
    quantized = lowbit.load_quantized(out)
    before, after, change = cells(stdout, "perplexity")
    assert float(before) == pytest.approx(ppl(fp_model, tiny), abs=0.006)
    assert float(after) == pytest.approx(ppl(quantized, tiny), abs=0.006)
    assert float(before) != float(after)
    assert change.endswith("%")
    for label in ("decode (tokens/s)", "linear layers (ms/token)"):
        row = cells(stdout, label)
        assert float(row[0]) > 0 and float(row[1]) > 0 and re.fullmatch(r"\d+\.\d\dx (faster|slower)", row[2])
    assert "14 quantized layers" in stdout.replace("\n    ", " ")


def test_quantize_rtn_and_published_budget(tiny, tmp_path, capsys):
    out = tmp_path / "rtn"
    code, stdout, err = run(quantize_args(tiny, out, "--method", "rtn", "--bits", "2", "--group-size", "32",
                                          "--no-bench"), capsys)
    assert code == 0, err
    assert lowbit.checkpoint_info(out)["schemes"] == {"2-bit g32": 14}
    model = lowbit.load_quantized(out)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"])
    lowbit.quantize_rtn(reference, 2, 32)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(layer.packed, reference.get_submodule(name).packed), name


def test_default_output_name(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run(["quantize", "--model", tiny["model"], "--method", "rtn", "--group-size", "-1",
                             "--no-eval", "--no-bench"], capsys)
    assert code == 0, err
    assert lowbit.checkpoint_info(tmp_path / "model-w3-per-row")["schemes"] == {
        "3-bit g64": 12, "3-bit g192": 2}  # one group per row: in_features 64, and 192 (down_proj)
    assert cli.default_output("smollm2", 3, 64) == Path("smollm2-135m-w3g64")
    assert cli.default_output("org/Some-Model", 2, 32) == Path("some-model-w2g32")


def test_new_methods_appear_in_the_command_line(tiny, tmp_path, capsys):
    class Renamed(RTN):
        name = "rtn-under-test"

    register(Renamed)
    try:
        code, stdout, _ = run(["quantize", "--help"], capsys)
        assert code == 0 and "rtn-under-test" in stdout
        code, _, err = run(quantize_args(tiny, tmp_path / "m", "--method", "rtn-under-test", "--no-eval",
                                         "--no-bench"), capsys)
        assert code == 0, err
        assert lowbit.checkpoint_info(tmp_path / "m")["method"] == "rtn-under-test"
    finally:
        METHODS.pop("rtn-under-test")


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")


def test_interrupted_quantize_resumes_to_the_same_checkpoint(tiny, tmp_path, capsys, monkeypatch, checkpoint):
    from lowbit.resume import CheckpointStore

    out = tmp_path / "resumed"
    save_block = CheckpointStore.save_block

    def save_then_interrupt(self, i, *a, **kw):
        save_block(self, i, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointStore, "save_block", save_then_interrupt)
    args = quantize_args(tiny, out, "--no-eval", "--no-bench", "--resume")
    code, _, err = run(args, capsys)
    assert code == 130 and "run the same command again to resume" in err
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "resumed.resume").glob("block_*")) == ["block_0000.safetensors"]

    monkeypatch.setattr(CheckpointStore, "save_block", save_block)
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert not (tmp_path / "resumed.resume").exists()  # the default directory is removed once saved
    resumed, uninterrupted = _tensors(out), _tensors(checkpoint)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_resume_directory_of_another_run_is_refused(tiny, tmp_path, capsys):
    blocks = tmp_path / "blocks"
    code, _, err = run(quantize_args(tiny, tmp_path / "a", "--no-eval", "--no-bench", "--resume", str(blocks)),
                       capsys)
    assert code == 0, err
    assert (blocks / "manifest.json").exists()  # an explicit directory is kept
    code, _, err = run(quantize_args(tiny, tmp_path / "b", "--no-eval", "--no-bench", "--resume", str(blocks),
                                     "--seed", "1"), capsys)
    assert_one_line_error(code, err)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("extra, status, match", [
    (["--bits", "5"], 2, r"--bits: invalid choice: 5"),
    (["--group-size", "48"], 2, r"--group-size: 48 is not a positive multiple of 32"),
    (["--group-size", "128"], 1, r"does not fit 14 linear layers.*fit every layer: 32, 64, or -1"),
    (["--sw-weight", "2"], 1, r"sw_weight must be in \[0, 1\]"),
    (["--lr", "clip"], 2, r"expected GROUP=VALUE"),
    (["--device", "tpu"], 1, r"device"),
    (["--epochs", "-1"], 2, r"must be at least 0"),
    (["--calibration", "no-such-file.txt"], 1, r"unknown text source 'no-such-file.txt'"),
    (["--eval-data", "no-such-file.txt"], 1, r"unknown text source"),
])
def test_quantize_refusals_are_one_line(tiny, tmp_path, capsys, extra, status, match):
    code, _, err = run(quantize_args(tiny, tmp_path / "x", "--no-bench", *extra), capsys)
    assert_one_line_error(code, err, status, match)
    assert not (tmp_path / "x").exists()


def test_quantize_refuses_missing_model_and_occupied_output(tiny, tmp_path, capsys):
    code, _, err = run(["quantize", "--model", str(tmp_path / "nothing"), "--no-eval"], capsys)
    assert_one_line_error(code, err, match="no such model directory")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    code, _, err = run(quantize_args(tiny, occupied), capsys)
    assert_one_line_error(code, err, match="exists and is not a model directory")
    assert (occupied / "notes.txt").read_text() == "mine"
    code, _, err = run(quantize_args(tiny, tiny["model"]), capsys)
    assert_one_line_error(code, err, match="is the model being quantized")


def test_quick_budget_of_each_method():
    """--budget quick (the default) shrinks every calibrating method's recipe to the CPU
    budget, explicit flags win over it, and --budget published keeps the method's own."""
    def config(*flags):
        return cli.quant_config(cli.build_parser().parse_args(["quantize", *flags]), None)

    for method in ("omniquant", "apiq", "tesseraq"):
        quick = config("--method", method)
        assert (quick.nsamples, quick.seqlen, quick.lr["clip"]) == (8, 512, cli.QUICK_CLIP_LR), method
    assert config("--method", "apiq").lr["lora"] == 1e-3
    tesseraq = config("--method", "tesseraq")
    assert tesseraq.rounding_steps == 3 and len(tesseraq.rounding_thresholds) == 4
    assert tesseraq.stage_epochs == {"lwc": 1} and tesseraq.lr["rounding"] == 5e-3

    published = config("--method", "tesseraq", "--budget", "published")
    assert (published.nsamples, published.rounding_steps, len(published.rounding_thresholds)) == (512, 250, 20)
    assert config("--method", "apiq", "--budget", "published").lr == {"lora": 5e-4, "clip": 5e-3}
    explicit = config("--method", "apiq", "--nsamples", "3", "--lr", "lora=0.01", "--lr", "clip=0.2")
    assert explicit.nsamples == 3 and explicit.lr == {"lora": 0.01, "clip": 0.2}
    assert config("--method", "rtn").nsamples == 0  # no data


def test_quantize_tesseraq(tiny, tmp_path, capsys):
    out = tmp_path / "tq"
    code, stdout, err = run(quantize_args(tiny, out, "--method", "tesseraq", "--no-bench"), capsys)
    assert code == 0, err
    info = lowbit.checkpoint_info(out)
    assert info["method"] == "tesseraq" and info["schemes"] == {"3-bit g64": 14}
    assert info["method_config"]["rounding_steps"] == 3
    before, after, _ = cells(stdout, "perplexity")
    assert float(after) == pytest.approx(ppl(lowbit.load_quantized(out), tiny), abs=0.006)


def test_quantize_apiq_with_saliency(tiny, tmp_path, capsys):
    out = tmp_path / "apiq"
    code, stdout, err = run(quantize_args(tiny, out, "--method", "apiq", "--saliency", "--no-bench"), capsys)
    assert code == 0, err
    assert "saliency from the calibration data" in stdout
    info = lowbit.checkpoint_info(out)
    assert info["method"] == "apiq" and info["method_config"]["saliency"]
    assert float(cells(stdout, "perplexity")[1]) == pytest.approx(ppl(lowbit.load_quantized(out), tiny), abs=0.006)


def test_saliency_refusals(tiny, tmp_path, capsys):
    code, _, err = run(quantize_args(tiny, tmp_path / "s", "--saliency"), capsys)
    assert_one_line_error(code, err, match="--saliency: omniquant does not use saliency; methods that do: apiq")
    code, _, err = run(quantize_args(tiny, tmp_path / "s", "--method", "apiq", "--saliency",
                                     str(tmp_path / "missing")), capsys)
    assert_one_line_error(code, err, match="no such directory")
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="omniquant does not use saliency"):
        lowbit.quantize(transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]),
                        lowbit.QuantConfig(method="omniquant", saliency=True))


# --- eval, generate --------------------------------------------------------------------------


def test_eval_of_checkpoint_and_full_precision_model(tiny, checkpoint, capsys):
    for source, model in [(str(checkpoint), lowbit.load_quantized(checkpoint)),
                          (tiny["model"], transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]))]:
        code, out, err = run(["eval", source, "--data", tiny["text"], "--seqlen", "48", "--max-windows", "3"],
                             capsys)
        assert code == 0, err
        printed = float(re.search(r"perplexity (\S+)", out).group(1))
        assert printed == pytest.approx(ppl(model, tiny, 48, 3), abs=0.0006)
        assert "3 windows x 48 tokens (141 predicted tokens)" in out


def test_eval_refusals(tiny, checkpoint, tmp_path, capsys):
    code, _, err = run(["eval", str(tmp_path / "missing")], capsys)
    assert_one_line_error(code, err, match="no such model directory")
    code, _, err = run(["eval", str(checkpoint), "--data", str(tmp_path / "missing.txt")], capsys)
    assert_one_line_error(code, err, match="unknown text source")
    code, _, err = run(["eval", str(checkpoint), "--data", tiny["text"], "--seqlen", "100000"], capsys)
    assert_one_line_error(code, err, match="fewer than one window")

    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run(["eval", str(truncated), "--data", tiny["text"]], capsys)
    assert_one_line_error(code, err, match="corrupt or truncated")

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoint, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    code, _, err = run(["eval", str(no_tokenizer), "--data", tiny["text"]], capsys)
    assert_one_line_error(code, err, match="no tokenizer files; name one with --tokenizer")
    code, out, err = run(["eval", str(no_tokenizer), "--data", tiny["text"], "--tokenizer", tiny["model"],
                          "--seqlen", "32", "--max-windows", "2"], capsys)
    assert code == 0 and "perplexity" in out, err


def test_generate_greedy_prints_the_models_continuation_and_its_speed(tiny, checkpoint, capsys):
    prompt = "the river of"
    code, out, err = run(["generate", str(checkpoint), "--prompt", prompt, "--max-new-tokens", "12"], capsys)
    assert code == 0, err
    model = lowbit.load_quantized(checkpoint)
    tokenizer = lowbit.load_tokenizer(checkpoint)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)
    continuation = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    assert out == prompt + continuation + "\n"
    n = generated.shape[1] - ids.shape[1]
    speed = re.search(rf"\[{n} new tokens in \S+ s: (\S+) tokens/s decoding", err)
    assert speed and float(speed.group(1)) > 0, err


def test_generate_sampling_is_seeded(checkpoint, capsys):
    outputs = []
    for seed in ("1", "1", "2"):
        code, out, err = run(["generate", str(checkpoint), "--sample", "--seed", seed, "--temperature", "1.5",
                              "--max-new-tokens", "24"], capsys)
        assert code == 0, err
        outputs.append(out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_generate_refusals(checkpoint, capsys):
    code, _, err = run(["generate", str(checkpoint), "--chat"], capsys)
    assert_one_line_error(code, err, match="no chat template")
    code, _, err = run(["generate", str(checkpoint), "--max-new-tokens", "0"], capsys)
    assert_one_line_error(code, err, match="--max-new-tokens must be at least 1")
    for flag, value in (("--temperature", "0"), ("--top-p", "1.5"), ("--top-k", "-1")):
        code, _, err = run(["generate", str(checkpoint), "--sample", flag, value], capsys)
        assert_one_line_error(code, err, match="--sample needs --temperature > 0")


# --- bench, export, info ---------------------------------------------------------------------


def test_bench_prints_a_row_per_measurement(capsys):
    code, out, err = run(["bench", "--shapes", "96x128", "--m", "1", "3", "--bits", "2", "3",
                          "--rotate-mb", "0.5", "--seconds", "0.01", "--group-size", "32"], capsys)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("96x128")]
    assert [(r[1], r[2]) for r in rows] == [("1", "2"), ("1", "3"), ("3", "2"), ("3", "3")]
    for r in rows:
        lowbit_ms, fp32_ms, vs_fp32 = float(r[3]), float(r[4]), float(r[6].rstrip("x"))
        # the ratio of the two times, up to their rounding to 0.001 ms and its own to 0.01
        low, high = (fp32_ms - 5e-4) / (lowbit_ms + 5e-4), (fp32_ms + 5e-4) / max(lowbit_ms - 5e-4, 1e-9)
        assert low - 0.005 <= vs_fp32 <= high + 0.005
    assert re.search(r"M = 1: 2-bit \S+x, 3-bit \S+x", out)


def test_bench_refusals(capsys):
    code, _, err = run(["bench", "--shapes", "96x100"], capsys)
    assert_one_line_error(code, err, match="in_features must be a positive multiple of 32")
    code, _, err = run(["bench", "--shapes", "96by128"], capsys)
    assert_one_line_error(code, err, match="out_features x in_features")
    code, _, err = run(["bench", "--m", "0"], capsys)
    assert_one_line_error(code, err, 2, match="--m: must be at least 1")


def test_export_gptq_then_import_gives_the_same_weights(checkpoint, tmp_path, capsys):
    out = tmp_path / "gptq"
    code, stdout, err = run(["export", str(checkpoint), str(out), "--format", "gptq"], capsys)
    assert code == 0, err
    assert "gptq_v2, 3-bit group size 64, 14 layers" in stdout
    assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    ours, theirs = lowbit.load_quantized(checkpoint), lowbit.load_gptq(out)
    for name, layer in ours.named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(layer.dequantize(), theirs.get_submodule(name).dequantize()), name


def _save_variant(tiny, path, overrides=None, fractional_zeros=False):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"])
    lowbit.quantize_rtn(model, 3, 64, overrides=overrides)
    if fractional_zeros:
        layer = model.model.layers[0].mlp.up_proj
        layer.zeros += 0.25
    lowbit.save_quantized(model, path, transformers.AutoTokenizer.from_pretrained(tiny["model"]))


def test_export_refusals(tiny, checkpoint, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    _save_variant(tiny, mixed, overrides={"down_proj": {"bits": 2}})
    code, _, err = run(["export", str(mixed), str(tmp_path / "mixed-gptq")], capsys)
    assert_one_line_error(code, err, match=r"differ from 3-bit.*Pass --dynamic")
    assert not (tmp_path / "mixed-gptq").exists()
    code, _, err = run(["export", str(mixed), str(tmp_path / "mixed-gptq"), "--dynamic"], capsys)
    assert code == 0, err
    assert lowbit.checkpoint_info(tmp_path / "mixed-gptq")["format"] == "gptq_v2"  # default output name

    fractional = tmp_path / "fractional"
    _save_variant(tiny, fractional, fractional_zeros=True)
    code, _, err = run(["export", str(fractional)], capsys)
    assert_one_line_error(code, err, match=r"model.layers.0.mlp.up_proj.*zeros are not integers")
    assert not (tmp_path / "fractional-gptq").exists()

    code, _, err = run(["export", tiny["model"]], capsys)
    assert_one_line_error(code, err, match="is a full precision model, not a lowbit checkpoint")
    code, _, err = run(["export", str(checkpoint), "--format", "awq"], capsys)
    assert_one_line_error(code, err, 2, match="invalid choice: 'awq'")


def test_export_of_an_adapted_checkpoint_needs_merge_adapters(tiny, tmp_path, capsys):
    """A checkpoint with low-rank adapters (as apiq writes): `lowbit info` lists them, export
    refuses them, and --merge-adapters exports the merged codes."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"])
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
    for name, layer in lowbit.checkpoint.quant_modules(model).items():
        want = layer.merge_and_requantize() if layer.adapter is not None else layer
        assert torch.equal(imported.get_submodule(name).dequantize(), want.dequantize()), name


def test_info_summarises_checkpoint_info(tiny, checkpoint, tmp_path, capsys):
    code, out, err = run(["info", str(checkpoint)], capsys)
    assert code == 0, err
    expected = lowbit.checkpoint_info(checkpoint)
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert fields["format"] == "lowbit v2"
    assert fields["quantized"] == "14 linear layers: 3-bit g64 x14"
    assert fields["full precision"] == "lm_head"
    assert fields["method"].startswith("omniquant (nsamples 2, seqlen 32, epochs 1, lr clip=0.1")
    assert fields["weights"] == f"{expected['weights_bytes'] / 1e6:.1f} MB in 1 file"
    assert fields["tokenizer"] == "saved"

    code, out, _ = run(["info", str(checkpoint), "--json"], capsys)
    assert code == 0 and json.loads(out) == json.loads(json.dumps(expected))

    mixed = tmp_path / "mixed"
    _save_variant(tiny, mixed, overrides={"down_proj": {"bits": 2}})
    code, out, _ = run(["info", str(mixed)], capsys)
    assert "14 linear layers: 3-bit g64 x12, 2-bit g64 x2" in out and "down_proj -> bits 2" in out

    code, out, _ = run(["info", tiny["model"]], capsys)
    assert code == 0 and "full precision" in out


def test_info_refusals_and_unexpected_errors(checkpoint, tmp_path, capsys, monkeypatch):
    code, _, err = run(["info", str(tmp_path / "missing")], capsys)
    assert_one_line_error(code, err, match="not a model directory")
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (broken / "config.json").write_text(json.dumps(config))
    code, _, err = run(["info", str(broken)], capsys)
    assert_one_line_error(code, err, match="format_version 99 is not supported")
    # --debug shows the traceback of a user error; an unexpected error always keeps it.
    with pytest.raises(lowbit.CheckpointError):
        cli.main(["info", str(broken), "--debug"])

    def broken_reader(path):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(lowbit.checkpoint, "checkpoint_info", broken_reader)
    with pytest.raises(RuntimeError, match="unexpected"):
        cli.main(["info", str(checkpoint)])


# --- help, python -m -------------------------------------------------------------------------


@pytest.mark.parametrize("command, flags", [
    ([], ["quantize", "eval", "generate", "bench", "export", "info"]),
    (["quantize"], ["--model", "--bits", "--group-size", "--method", "--sw-weight", "--saliency",
                    "--calibration", "--nsamples", "--seqlen", "--epochs", "--device", "--seed", "--output",
                    "--resume", "--no-eval", "smollm2-135m-w3g64"]),
    (["eval"], ["--data", "--split", "--seqlen", "--max-windows", "wikitext2"]),
    (["generate"], ["--prompt", "--max-new-tokens", "--sample", "--temperature", "--chat"]),
    (["bench"], ["--shapes", "--m", "--bits", "--threads", "--rotate-mb"]),
    (["export"], ["--format", "--dynamic", "GPTQ v2"]),
    (["info"], ["--json"]),
])
def test_help(command, flags, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for flag in flags:
        assert flag in out, flag


def test_python_m_lowbit(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "lowbit", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0 and "quantize" in done.stdout
    done = subprocess.run([sys.executable, "-m", "lowbit", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"lowbit: error: {tmp_path / 'missing'} is not a model "
                                                "directory (no config.json)"]


# --- the real default --------------------------------------------------------------------------


@pytest.mark.slow
def test_default_quantize_on_smollm2(tmp_path, capsys, monkeypatch):
    """`lowbit quantize` on the built-in default with a smaller calibration budget (CI time).
    The full-precision perplexity on the first 8 windows of 512 tokens is pinned (13.16, as
    in test_smollm2), and the quantized one must beat round-to-nearest on the same windows."""
    from lowbit.evaluate import dense_weights, token_perplexity

    try:
        assets.smollm2_dir()
        assets.load_texts("sotu", "calibration")
        wiki = assets.load_texts("wiki", "evaluation")
    except assets.AssetError as exc:
        pytest.skip(f"the default model or texts are not available: {exc}")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["quantize", "--nsamples", "2", "--epochs", "2", "--eval-windows", "8"], capsys)
    assert code == 0, err
    output = tmp_path / "smollm2-135m-w3g64"
    info = lowbit.checkpoint_info(output)
    assert info["quantized_modules"] == 210 and info["schemes"] == {"3-bit g64": 210}
    assert info["method"] == "omniquant" and info["method_config"]["seqlen"] == 512

    fp_size, q_size, _ = cells(out, "size (MB)")
    assert float(fp_size) == pytest.approx(538, abs=1)
    assert float(q_size) == pytest.approx(info["weights_bytes"] / 1e6, abs=0.06)
    fp_layers, q_layers, _ = cells(out, "quantized layers (MB)")
    assert float(q_layers) < float(fp_layers) / 8  # 3.5 bits per weight with fp16 scales and zeros at g64
    before, after, _ = cells(out, "perplexity, wiki")
    assert float(before) == pytest.approx(13.16, abs=0.01)

    rtn, tokenizer = assets.load_model()
    lowbit.quantize(rtn, lowbit.QuantConfig(method="rtn", bits=3, group_size=64, progress=False))
    with dense_weights(rtn):
        rtn_ppl = token_perplexity(rtn, token_stream(tokenizer, wiki), 512, 8, progress=False)
    assert float(before) < float(after) < rtn_ppl
    for label in ("decode (tokens/s)", "linear layers (ms/token)"):
        assert re.fullmatch(r"\d+\.\d\dx (faster|slower)", cells(out, label)[2])
