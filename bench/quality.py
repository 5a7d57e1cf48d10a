"""Quality of the calibration recipes on the real model and real text.

SmolLM2-135M-Instruct (lowbit.io.assets), every linear layer of the decoder blocks
quantized (embeddings and lm_head stay in full precision), calibrated on State of
the Union speeches before 2000, evaluated on the two held-out splits (the last
3,000 Wikipedia extracts, and the speeches from 2000 on). Prints and writes a
markdown table: perplexities (mean +- standard deviation over seeds), calibration
time and peak memory, and the share of the perplexity gap to full precision that
the sliced-Wasserstein term and the end-to-end stage recover, seed by seed (runs
of one seed share their calibration windows).

A recipe is a method with modifiers joined by "+", each a flag of `lowbit quantize`
with the budget it would get there (--budget quick, or the flags given here):

    rtn, gptq, omniquant, apiq, tesseraq     --method
    +gptq       --init gptq (omniquant, apiq, tesseraq start from GPTQ's codes)
    +sw         --sw-weight (--sw-weight here, 0.1 by default)
    +saliency   --saliency (apiq)
    +e2e        --e2e-epochs (--e2e-epochs here, 2 by default)

    python bench/quality.py --settings w3g64 --recipes rtn,gptq,omniquant+gptq,omniquant+gptq+e2e

Run heavy jobs under the shared lock on the development machine:

    flock /tmp/lowbit-cpu.lock python bench/quality.py

`--eval-weights dense` evaluates the same quantized weights with dense matmuls
instead of the QuantLinear kernels (fast where no fast kernel exists; tests show
the two agree); the default is `packed`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lowbit  # noqa: E402
from lowbit._version import library_versions  # noqa: E402
from lowbit.cli import build_parser  # noqa: E402
from lowbit.cli.quantize import quant_config as cli_quant_config  # noqa: E402
from lowbit.calib.data import sample_windows, token_stream  # noqa: E402
from lowbit.eval.perplexity import token_perplexity  # noqa: E402
from lowbit.io import assets  # noqa: E402
from lowbit.nn.convert import dense_weights  # noqa: E402
from lowbit.nn.modules import incompatibility, linear_layers  # noqa: E402

# Group sizes that fit every layer of the default model (rows of 576 and 1536): 128 fits
# only the down projections (check_settings refuses such a setting).
SETTINGS = {"w3g64": (3, 64), "w2g64": (2, 64), "w4g64": (4, 64), "w3g32": (3, 32), "w2g32": (2, 32),
            "w3g192": (3, 192), "w4g192": (4, 192)}
BASE_METHODS = ("rtn", "gptq", "omniquant", "apiq", "tesseraq")
MODIFIERS = ("gptq", "sw", "saliency", "e2e")
DEFAULT_RECIPES = "rtn,gptq,omniquant,omniquant+gptq,omniquant+gptq+e2e"
SPLITS = ("wiki", "sotu")


def parse_recipe(recipe: str) -> tuple[str, list[str]]:
    """"apiq+gptq+saliency" -> ("apiq", ["gptq", "saliency"]); "fp" is the unquantized model."""
    base, *modifiers = recipe.split("+")
    if recipe != "fp" and (base not in BASE_METHODS or any(m not in MODIFIERS for m in modifiers)
                           or len(set(modifiers)) != len(modifiers)):
        raise SystemExit(f"bad recipe {recipe!r}: fp, or one of {BASE_METHODS} followed by any of "
                         f"{', '.join('+' + m for m in MODIFIERS)}")
    return base, modifiers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="w3g64,w2g64", help=f"comma list of {','.join(SETTINGS)}")
    p.add_argument("--recipes", default=DEFAULT_RECIPES, help="comma list of recipes (see above), and fp")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the calibrated recipes")
    p.add_argument("--flags", default="",
                   help="more `lowbit quantize` flags for every calibrated recipe, e.g. '--nsamples 16 --epochs 4' "
                        "(default: the quick budget)")
    p.add_argument("--sw-weight", type=float, default=0.1, help="w of the +sw recipes")
    p.add_argument("--e2e-epochs", type=int, default=2, help="epochs of the +e2e recipes")
    p.add_argument("--eval-windows", type=int, default=4, help="windows per evaluation split")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-weights", choices=("packed", "dense"), default="packed",
                   help="evaluate through QuantLinear (packed) or dense dequantized weights")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--output", default=None, help="also write the markdown table here")
    p.add_argument("--json", default=None, help="also write every number and block log here")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: print one table of the results in these --json files (for example "
                        "one run per seed or setting, run side by side)")
    return p.parse_args(argv)


class PeakRSS:
    """Samples the process's resident memory in a thread; `peak` in bytes."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def evaluate(model, streams, args) -> dict[str, float]:
    def run():
        return {split: token_perplexity(model, stream, args.eval_seqlen, args.eval_windows, progress=False)
                for split, stream in streams.items()}

    if args.eval_weights == "dense":
        with dense_weights(model):
            return run()
    return run()


MODIFIER_FLAGS = {"gptq": lambda args: ["--init", "gptq"], "sw": lambda args: ["--sw-weight", str(args.sw_weight)],
                  "saliency": lambda args: ["--saliency"], "e2e": lambda args: ["--e2e-epochs", str(args.e2e_epochs)]}


def check_settings(model, settings: list[str]) -> None:
    """Refuses a setting whose group size does not fit every decoder layer: lowbit would
    keep those layers in full precision, and the row would not be the setting it names."""
    layers = {name: layer for name, layer in linear_layers(model).items() if name != "lm_head"}
    for setting in settings:
        misfits = [name for name, layer in layers.items() if incompatibility(layer, SETTINGS[setting][1])]
        if misfits:
            raise SystemExit(f"setting {setting}: its group size does not fit {len(misfits)} of the "
                             f"{len(layers)} layers (e.g. {misfits[0]}); they would stay in full precision")


def quant_config(recipe: str, bits: int, group_size: int, seed: int, args) -> lowbit.QuantConfig:
    """The QuantConfig `lowbit quantize` would run for this recipe."""
    base, modifiers = parse_recipe(recipe)
    flags = ["--method", base, "--bits", str(bits), "--group-size", str(group_size), "--seed", str(seed)]
    if base != "rtn":
        flags += args.flags.split()
    for modifier in modifiers:
        flags += MODIFIER_FLAGS[modifier](args)
    if "e2e" not in modifiers and base != "rtn":
        flags += ["--e2e-epochs", "0"]  # the quick budget of gptq includes the stage: only +e2e runs it
    config = cli_quant_config(build_parser().parse_args(["quantize", *flags]), None)
    config.progress = False
    return config


def run(args) -> dict:
    run_started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [s for s in args.settings.split(",") if s]
    recipes = [r for r in args.recipes.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for recipe in recipes:
        parse_recipe(recipe)
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting {unknown[0]!r}: one of {', '.join(SETTINGS)}")
    model_dir = assets.smollm2_dir()
    model, tokenizer = assets.load_model()
    check_settings(model, settings)
    calibration_stream = token_stream(tokenizer, assets.load_texts("sotu", "calibration"))
    streams = {split: token_stream(tokenizer, assets.load_texts(split, "evaluation")) for split in SPLITS}
    results = []

    def record(setting, recipe, seed, ppl, seconds=None, peak=None, report=None, config=None):
        row = {"setting": setting, "recipe": recipe, "seed": seed, **ppl,
               "calibration_s": seconds, "peak_rss_gb": None if peak is None else peak / 2**30}
        if report is not None:
            row["report"] = report.to_dict()
        if config is not None:
            row["budget"] = {k: getattr(config, k) for k in ("nsamples", "seqlen", "epochs", "e2e_epochs")}
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)

    if "fp" in recipes:
        record("-", "fp", None, evaluate(model, streams, args))
    del model
    for setting in settings:
        bits, group_size = SETTINGS[setting]
        for recipe in recipes:
            if recipe == "fp":
                continue
            for seed in ([None] if recipe == "rtn" else seeds):
                model, _ = assets.load_model()
                config = quant_config(recipe, bits, group_size, seed or 0, args)
                tokens = None
                if recipe != "rtn":
                    tokens = sample_windows(calibration_stream, config.nsamples, config.seqlen, seed)
                with PeakRSS() as memory:
                    started = time.perf_counter()
                    report = lowbit.quantize(model, config, tokens)
                    seconds = time.perf_counter() - started
                record(setting, recipe, seed, evaluate(model, streams, args), seconds, memory.peak, report, config)
                del model
    meta = {**metadata(), "wall_s": time.perf_counter() - run_started}
    return {"args": vars(args), "model": str(model_dir), "results": results, "meta": meta}


def metadata() -> dict:
    """Date, commit, torch, threads, kernel variant and the command line of this run."""

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"

    return {
        "date": datetime.date.today().isoformat(),
        "commit": git("rev-parse", "--short", "HEAD") + (" (modified)" if git("status", "--porcelain", "-uno") else ""),
        **library_versions(),
        "threads": torch.get_num_threads(),
        "command": " ".join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "cpu_isa": lowbit.ops.cpu_isa(),
    }


# --- the table ---------------------------------------------------------------------------


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values, digits=2):
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    text = f"{mean:.{digits}f}" if mean < 1e4 else f"{mean:.3g}"
    return text + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


def gap_recovered(results, setting, split, modifier) -> dict[str, list[float]]:
    """For every recipe R whose R+modifier also ran: per seed, the share of R's perplexity
    gap to full precision that the modifier recovers, (PPL_R - PPL_R+m) / (PPL_R - PPL_fp), in %."""
    fp = [r[split] for r in results if r["recipe"] == "fp"]
    if not fp:
        return {}
    runs = {}
    for r in results:
        if r["setting"] == setting:
            runs.setdefault(r["recipe"], {})[r["seed"]] = r[split]
    shares = {}
    for recipe, by_seed in runs.items():
        base, modifiers = parse_recipe(recipe)
        if base == "fp" or modifier not in modifiers:
            continue
        without = "+".join([base] + [m for m in modifiers if m != modifier])
        if without in runs:
            shares[f"{without} +{modifier}"] = [100 * (runs[without][s] - p) / (runs[without][s] - fp[0])
                                                for s, p in sorted(by_seed.items()) if s in runs[without]]
    return shares


def budget_text(rows) -> str:
    budget = rows[0].get("budget")
    if not budget or not budget["nsamples"]:
        return "-"
    text = f"{budget['nsamples']}x{budget['seqlen']}, {budget['epochs']} ep"
    return text + (f", e2e {budget['e2e_epochs']}" if budget["e2e_epochs"] else "")


def table(run_result: dict) -> str:
    results, args, meta = run_result["results"], run_result["args"], run_result["meta"]
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, {meta['threads']} threads, "
        f"CPU kernel {meta['cpu_isa']}, whole run {meta['wall_s'] / 60:.1f} min, evaluation through "
        + ("QuantLinear (packed kernels)" if args["eval_weights"] == "packed" else "dense dequantized weights")
        + ".  ",
        f"Calibration: SOTU speeches before 2000, `lowbit quantize` flags of each recipe plus "
        f"`{args['flags'] or '(none: the quick budget)'}`; +sw w = {args['sw_weight']}, +e2e "
        f"{args['e2e_epochs']} epochs; seeds {args['seeds']}.  ",
        f"Evaluation: first {args['eval_windows']} windows x {args['eval_seqlen']} tokens of each split "
        "(wiki: last 3,000 Wikipedia extracts; sotu: speeches from 2000 on).",
        "",
        "| setting | recipe | budget (windows x tokens, epochs) | wiki PPL | sotu PPL | calibration (s) "
        "| peak RSS (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["setting"], r["recipe"]) for r in results))
    for setting, recipe in keys:
        rows = [r for r in results if r["setting"] == setting and r["recipe"] == recipe]
        lines.append(
            f"| {setting} | {recipe} | {budget_text(rows)} | {fmt([r['wiki'] for r in rows])} "
            f"| {fmt([r['sotu'] for r in rows])} | {fmt([r['calibration_s'] for r in rows], 0)} "
            f"| {fmt([r['peak_rss_gb'] for r in rows])} |"
        )
    gap_lines = []
    for setting in dict.fromkeys(r["setting"] for r in results if r["setting"] != "-"):
        for modifier in ("sw", "e2e", "saliency", "gptq"):
            for split in SPLITS:
                for pair, shares in gap_recovered(results, setting, split, modifier).items():
                    if shares:
                        mean, std = mean_std(shares)
                        gap_lines.append(f"| {setting} | {pair} | {split} | {mean:+.1f} % | {std:.1f} % | "
                                         + ", ".join(f"{s:+.1f}" for s in shares) + " |")
    if gap_lines:
        lines += [
            "",
            "Share of the perplexity gap to full precision recovered by adding a modifier, "
            "(PPL_without - PPL_with) / (PPL_without - PPL_fp), per seed (positive: it helps):",
            "",
            "| setting | recipe, modifier | split | mean | std | per seed |",
            "|---|---|---|---|---|---|",
        ] + gap_lines
    return "\n".join(lines) + "\n"


def merged(paths: list[str]) -> dict:
    """The results of several --json runs as one run: the first run's settings, every
    result, each run's command and the sum of their wall times."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    meta = {**runs[0]["meta"], "wall_s": sum(r["meta"]["wall_s"] for r in runs),
            "command": "; ".join(r["meta"]["command"] for r in runs)}
    args = {**runs[0]["args"], "seeds": ",".join(dict.fromkeys(r["args"]["seeds"] for r in runs))}
    return {"args": args, "results": [row for r in runs for row in r["results"]], "meta": meta}


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        print(table(merged(args.merge)), end="")
        return
    result = run(args)
    text = table(result)
    print(text)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
