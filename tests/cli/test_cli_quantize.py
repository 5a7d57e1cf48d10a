"""`lowbit quantize`, end to end on the tiny model: the summary it prints, the checkpoint
it saves, resume, the quick budget of each method, and its refusals. The slow test runs
the real default with a reduced budget."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from cli_tools import assert_one_line_error, cells, ppl, quantize_args, run
from safetensors.torch import load_file

import lowbit
from lowbit.calib.config import QuantConfig
from lowbit.calib.data import token_stream
from lowbit.calib.methods import METHODS, get_method, register
from lowbit.calib.methods.base import QUICK_BUDGET, QUICK_CLIP_LR
from lowbit.calib.methods.rtn import RTN
from lowbit.calib.resume import CheckpointStore
from lowbit.cli import build_parser, quantize
from lowbit.errors import AssetError
from lowbit.eval.perplexity import token_perplexity
from lowbit.io import assets
from lowbit.nn import QuantLinear
from lowbit.nn.convert import dense_weights


def test_quantize_prints_the_summary_of_what_it_saved(tiny_hf, tmp_path, capsys):
    out = tmp_path / "ckpt"
    code, stdout, err = run(quantize_args(tiny_hf, out), capsys)
    assert code == 0, err

    info = lowbit.checkpoint_info(out)
    assert info["format"] == "lowbit v2" and info["method"] == "gptq"
    assert info["quantized_modules"] == 14 and info["schemes"] == {"3-bit g64": 14}
    assert info["full_precision_modules"] == ["lm_head"] and info["tokenizer"]
    assert info["method_config"]["nsamples"] == 2 and info["method_config"]["e2e_epochs"] == 2

    size = cells(stdout, "size (MB)")
    fp_bytes = (Path(tiny_hf["model"]) / "model.safetensors").stat().st_size
    assert size[:2] == [f"{fp_bytes / 1e6:.1f}", f"{info['weights_bytes'] / 1e6:.1f}"]
    # The printed perplexities are those of the original model and of the saved checkpoint.
    fp_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf["model"])
    quantized = lowbit.load_quantized(out)
    before, after, change = cells(stdout, "perplexity")
    assert float(before) == pytest.approx(ppl(fp_model, tiny_hf), abs=0.006)
    assert float(after) == pytest.approx(ppl(quantized, tiny_hf), abs=0.006)
    assert float(before) != float(after)
    assert change.endswith("%")
    # KL divergence and top-1 agreement of the saved checkpoint against the original, recomputed.
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_hf["model"])
    expected = lowbit.evaluate(quantized, tokenizer, [Path(tiny_hf["text"]).read_text()], 32, 4,
                               reference=fp_model, progress=False)
    kl = cells(stdout, "KL divergence (nats)")
    assert kl == [f"{expected.kl_mean:.3f}", f"median {expected.kl_median:.3f}, p99 {expected.kl_p99:.2f}"]
    assert expected.kl_mean > 0
    assert cells(stdout, "top-1 agreement") == [f"{100 * expected.top1_agreement:.1f} %"]
    assert f"transformers {transformers.__version__}" in stdout
    for label in ("decode (tokens/s)", "linear layers (ms/token)"):
        row = cells(stdout, label)
        assert float(row[0]) > 0 and float(row[1]) > 0 and re.fullmatch(r"\d+\.\d\dx (faster|slower)", row[2])
    assert "14 quantized layers" in stdout.replace("\n    ", " ")


def test_quantize_rtn_and_published_budget(tiny_hf, tmp_path, capsys):
    out = tmp_path / "rtn"
    code, stdout, err = run(quantize_args(tiny_hf, out, "--method", "rtn", "--bits", "2", "--group-size", "32",
                                          "--no-bench"), capsys)
    assert code == 0, err
    assert lowbit.checkpoint_info(out)["schemes"] == {"2-bit g32": 14}
    model = lowbit.load_quantized(out)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf["model"])
    lowbit.quantize_rtn(reference, 2, 32)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(layer.packed, reference.get_submodule(name).packed), name


def test_default_output_name(tiny_hf, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run(["quantize", "--model", tiny_hf["model"], "--method", "rtn", "--group-size", "-1",
                             "--no-eval", "--no-bench"], capsys)
    assert code == 0, err
    assert lowbit.checkpoint_info(tmp_path / "model-w3-per-row")["schemes"] == {
        "3-bit g64": 12, "3-bit g192": 2}  # one group per row: in_features 64, and 192 (down_proj)
    assert quantize.default_output("smollm2", 3, 64) == Path("smollm2-135m-w3g64")
    assert quantize.default_output("org/Some-Model", 2, 32) == Path("some-model-w2g32")


def test_new_methods_appear_in_the_command_line(tiny_hf, tmp_path, capsys):
    class Renamed(RTN):
        name = "rtn-under-test"

    register(Renamed)
    try:
        code, stdout, _ = run(["quantize", "--help"], capsys)
        assert code == 0 and "rtn-under-test" in stdout
        code, _, err = run(quantize_args(tiny_hf, tmp_path / "m", "--method", "rtn-under-test", "--no-eval",
                                         "--no-bench"), capsys)
        assert code == 0, err
        assert lowbit.checkpoint_info(tmp_path / "m")["method"] == "rtn-under-test"
    finally:
        METHODS.pop("rtn-under-test")


def _tensors(path):
    return load_file(Path(path) / "model.safetensors")


def test_interrupted_quantize_resumes_to_the_same_checkpoint(tiny_hf, tmp_path, capsys, monkeypatch, tiny_checkpoint):
    out = tmp_path / "resumed"
    save_block = CheckpointStore.save_block

    def save_then_interrupt(self, i, *a, **kw):
        save_block(self, i, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(CheckpointStore, "save_block", save_then_interrupt)
    args = quantize_args(tiny_hf, out, "--no-eval", "--no-bench", "--resume")
    code, _, err = run(args, capsys)
    assert code == 130 and "run the same command again to resume" in err
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "resumed.resume").glob("block_*")) == ["block_0000.safetensors"]

    monkeypatch.setattr(CheckpointStore, "save_block", save_block)
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert not (tmp_path / "resumed.resume").exists()  # the default directory is removed once saved
    resumed, uninterrupted = _tensors(out), _tensors(tiny_checkpoint)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_quantize_in_two_processes(tiny_hf, tmp_path, tiny_checkpoint):
    """--nproc 2 starts torchrun: two gloo processes, one summary, the one-process checkpoint."""
    out = tmp_path / "two"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    args = quantize_args(tiny_hf, out, "--no-eval", "--no-bench", "--nproc", "2")
    done = subprocess.run([sys.executable, "-m", "lowbit", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("lowbit quantize:") == 1 and "resident memory" in done.stdout
    two, one = _tensors(out), _tensors(tiny_checkpoint)
    assert two.keys() == one.keys()
    packed = [k for k in one if k.endswith("packed")]
    agree = sum((two[k] == one[k]).sum().item() for k in packed) / sum(one[k].numel() for k in packed)
    assert agree >= 0.999


def test_resume_directory_of_another_run_is_refused(tiny_hf, tmp_path, capsys):
    blocks = tmp_path / "blocks"
    code, _, err = run(quantize_args(tiny_hf, tmp_path / "a", "--no-eval", "--no-bench", "--resume", str(blocks)),
                       capsys)
    assert code == 0, err
    assert (blocks / "manifest.json").exists()  # an explicit directory is kept
    code, _, err = run(quantize_args(tiny_hf, tmp_path / "b", "--no-eval", "--no-bench", "--resume", str(blocks),
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
    (["--override", "down_proj"], 2, r"--override: expected PATTERN=BITS.*see lowbit quantize --help"),
    (["--override", "down_proj=5"], 1, r"bits.*see lowbit quantize --help"),
    (["--override", "down_proj=g48"], 1, r"group_size.*see lowbit quantize --help"),
])
def test_quantize_refusals_are_one_line(tiny_hf, tmp_path, capsys, extra, status, match):
    code, _, err = run(quantize_args(tiny_hf, tmp_path / "x", "--no-bench", *extra), capsys)
    assert_one_line_error(code, err, status, match)
    assert not (tmp_path / "x").exists()


def test_quantize_per_layer_settings_from_the_command_line(tiny_hf, tmp_path, capsys):
    """--override and --keep in order (the first match wins), as the Python overrides."""
    out = tmp_path / "mixed"
    code, stdout, err = run(quantize_args(
        tiny_hf, out, "--method", "rtn", "--no-bench", "--no-eval", "--override", "model.layers.0.mlp.down_proj=2",
        "--keep", r"model\.layers\.0\.mlp\.down_proj", "--override", "down_proj=4g32", "--keep", "o_proj",
        "--override", "lm_head=g32"), capsys)
    assert code == 0, err
    info = lowbit.checkpoint_info(out)
    assert info["schemes"] == {"3-bit g64": 10, "2-bit g64": 1, "4-bit g32": 1, "3-bit g32": 1}
    assert sorted(info["full_precision_modules"]) == ["model.layers.0.self_attn.o_proj",
                                                      "model.layers.1.self_attn.o_proj"]
    assert "per layer: model.layers.0.mlp.down_proj w2g64, " in stdout and "o_proj kept" in stdout


def test_quantize_reads_the_texts_before_the_model(tiny_hf, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(quantize, "load_full_precision", never)
    code, _, err = run(quantize_args(tiny_hf, tmp_path / "x", "--eval-data", str(tmp_path / "missing")), capsys)
    assert_one_line_error(code, err, match="unknown text source")


def test_quantize_refuses_missing_model_and_occupied_output(tiny_hf, tmp_path, capsys):
    code, _, err = run(["quantize", "--model", str(tmp_path / "nothing"), "--no-eval"], capsys)
    assert_one_line_error(code, err, match="no such model directory")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    code, _, err = run(quantize_args(tiny_hf, occupied), capsys)
    assert_one_line_error(code, err, match="exists and is not a model directory")
    assert (occupied / "notes.txt").read_text() == "mine"
    code, _, err = run(quantize_args(tiny_hf, tiny_hf["model"]), capsys)
    assert_one_line_error(code, err, match="is the model being quantized")


def test_quick_budget_of_each_method():
    """--budget quick (the default) shrinks every calibrating method's recipe to the CPU
    budget (the method's `quick`), explicit flags win over it, and --budget published
    keeps the method's own."""
    def config(*flags):
        return quantize.quant_config(build_parser().parse_args(["quantize", *flags]), None)

    def quick_budget(method):
        return get_method(method).quick(QuantConfig(method=method))

    assert (QUICK_BUDGET, QUICK_CLIP_LR) == ({"nsamples": 8, "seqlen": 512, "epochs": 2}, 0.1)
    for method in ("omniquant", "apiq", "tesseraq"):
        budget = quick_budget(method)
        assert {k: budget[k] for k in QUICK_BUDGET} == QUICK_BUDGET, method
        assert budget["lr"]["clip"] == QUICK_CLIP_LR, method
        quick = config("--method", method)
        assert (quick.nsamples, quick.seqlen, quick.epochs, quick.lr["clip"]) == (8, 512, 2, QUICK_CLIP_LR), method
    assert quick_budget("apiq")["lr"] == {"clip": QUICK_CLIP_LR, "lora": 1e-3}
    # gptq: the end-to-end stage at 2 and 3 bits only
    assert [config("--bits", str(bits)).e2e_epochs for bits in (2, 3, 4)] == [2, 2, 0]
    assert config("--bits", "4", "--e2e-epochs", "1").e2e_epochs == 1
    assert config("--method", "apiq").lr["lora"] == 1e-3
    budget = quick_budget("tesseraq")
    assert budget["rounding_steps"] == 3 and budget["rounding_thresholds"] == (0.5, 0.25, 0.1, 0.03)
    assert budget["stage_epochs"] == {"lwc": 1}
    assert budget["lr"] == {"clip": QUICK_CLIP_LR, "rounding": 5e-3, "scale": 5e-3}
    tesseraq = config("--method", "tesseraq")
    assert tesseraq.rounding_steps == 3 and len(tesseraq.rounding_thresholds) == 4
    assert tesseraq.stage_epochs == {"lwc": 1} and tesseraq.lr["rounding"] == 5e-3

    published = config("--method", "tesseraq", "--budget", "published")
    assert (published.nsamples, published.rounding_steps, len(published.rounding_thresholds)) == (512, 250, 20)
    assert config("--method", "apiq", "--budget", "published").lr == {"lora": 5e-4, "clip": 5e-3}
    explicit = config("--method", "apiq", "--nsamples", "3", "--lr", "lora=0.01", "--lr", "clip=0.2")
    assert explicit.nsamples == 3 and explicit.lr == {"lora": 0.01, "clip": 0.2}
    assert quick_budget("rtn") == {}  # no data, nothing to shrink
    assert config("--method", "rtn").nsamples == 0  # no data


def test_quantize_tesseraq(tiny_hf, tmp_path, capsys):
    out = tmp_path / "tq"
    code, stdout, err = run(quantize_args(tiny_hf, out, "--method", "tesseraq", "--no-bench"), capsys)
    assert code == 0, err
    info = lowbit.checkpoint_info(out)
    assert info["method"] == "tesseraq" and info["schemes"] == {"3-bit g64": 14}
    assert info["method_config"]["rounding_steps"] == 3
    before, after, _ = cells(stdout, "perplexity")
    assert float(after) == pytest.approx(ppl(lowbit.load_quantized(out), tiny_hf), abs=0.006)


def test_quantize_apiq_with_saliency(tiny_hf, tmp_path, capsys):
    out = tmp_path / "apiq"
    code, stdout, err = run(quantize_args(tiny_hf, out, "--method", "apiq", "--saliency", "--no-bench"), capsys)
    assert code == 0, err
    assert "saliency from the calibration data" in stdout
    info = lowbit.checkpoint_info(out)
    assert info["method"] == "apiq" and info["method_config"]["saliency"]
    quantized = lowbit.load_quantized(out)
    assert float(cells(stdout, "perplexity")[1]) == pytest.approx(ppl(quantized, tiny_hf), abs=0.006)


def test_saliency_refusals(tiny_hf, tmp_path, capsys):
    code, _, err = run(quantize_args(tiny_hf, tmp_path / "s", "--method", "omniquant", "--saliency"), capsys)
    assert_one_line_error(code, err, match="--saliency: omniquant does not use saliency; methods that do: apiq")
    code, _, err = run(quantize_args(tiny_hf, tmp_path / "s", "--method", "apiq", "--saliency",
                                     str(tmp_path / "missing")), capsys)
    assert_one_line_error(code, err, match="no such directory")
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="omniquant does not use saliency"):
        lowbit.quantize(transformers.AutoModelForCausalLM.from_pretrained(tiny_hf["model"]),
                        lowbit.QuantConfig(method="omniquant", saliency=True))


def test_init_and_end_to_end_flags(tiny_hf, tmp_path, capsys):
    def config(*flags):
        return quantize.quant_config(build_parser().parse_args(["quantize", *flags]), None)

    assert config("--method", "omniquant", "--init", "gptq", "--e2e-epochs", "2").init == "gptq"
    assert config("--nproc", "2").e2e_epochs == 0  # the default's end-to-end stage needs one process
    assert config("--method", "apiq", "--init", "rtn").init == "rtn"
    assert config("--e2e-epochs", "3").e2e_epochs == 3
    code, _, err = run(quantize_args(tiny_hf, tmp_path / "g", "--method", "gptq", "--init", "gptq"), capsys)
    assert_one_line_error(code, err, match="--init: gptq has no starting point to choose; methods that do: apiq")
    code, _, err = run(quantize_args(tiny_hf, tmp_path / "r", "--method", "rtn", "--e2e-epochs", "1"), capsys)
    assert_one_line_error(code, err, match="end-to-end stage")
    assert not (tmp_path / "g").exists() and not (tmp_path / "r").exists()


# --- the real default --------------------------------------------------------------------------


@pytest.mark.slow
def test_default_quantize_on_smollm2(tmp_path, capsys, monkeypatch):
    """`lowbit quantize` on the built-in default with a smaller calibration budget (CI time).
    The full-precision perplexity on the first 8 windows of 512 tokens is pinned (13.16, as
    in test_smollm2), and the quantized one must beat round-to-nearest on the same windows."""
    try:
        assets.smollm2_dir()
        assets.load_texts("sotu", "calibration")
        wiki = assets.load_texts("wiki", "evaluation")
    except AssetError as exc:
        pytest.skip(f"the default model or texts are not available: {exc}")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["quantize", "--nsamples", "2", "--eval-windows", "8"], capsys)
    assert code == 0, err
    output = tmp_path / "smollm2-135m-w3g64"
    info = lowbit.checkpoint_info(output)
    assert info["quantized_modules"] == 210 and info["schemes"] == {"3-bit g64": 210}
    assert info["method"] == "gptq" and info["method_config"]["seqlen"] == 512
    assert info["method_config"]["e2e_epochs"] == 2  # the default job's end-to-end stage

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
