"""Quality of the calibration methods on the real model and real text.

SmolLM2-135M-Instruct (lowbit.io.assets), every linear layer of the decoder blocks
quantized (embeddings and lm_head stay in full precision), calibrated on State of
the Union speeches before 2000, evaluated on the two held-out splits (the last
3,000 Wikipedia extracts, and the speeches from 2000 on). Prints and writes a
markdown table: perplexities (mean +- standard deviation over seeds), calibration
time and peak memory, and the share of the full-precision-to-omniquant gap that
the sliced-Wasserstein term recovers, seed by seed (the MSE and MSE+SW runs of one
seed share their calibration windows).

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
from lowbit.calib.data import sample_windows, token_stream  # noqa: E402
from lowbit.eval.perplexity import token_perplexity  # noqa: E402
from lowbit.io import assets  # noqa: E402
from lowbit.nn.convert import dense_weights  # noqa: E402

SETTINGS = {"w3g64": (3, 64), "w2g64": (2, 64), "w4g64": (4, 64), "w3g32": (3, 32), "w2g32": (2, 32)}
METHODS = ("fp", "rtn", "omniquant", "omniquant-sw")
SPLITS = ("wiki", "sotu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="w3g64,w2g64", help=f"comma list of {','.join(SETTINGS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {','.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the calibrated methods")
    p.add_argument("--nsamples", type=int, default=4, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--epochs", type=int, default=2, help="epochs per block")
    p.add_argument("--lr", type=float, default=0.5,
                   help="learning rate of the clip logits (high: the budget is 8 steps per block)")
    p.add_argument("--aug-loss", choices=("default", "on", "off"), default="default",
                   help="second target (default: the method's, on at 2 bits)")
    p.add_argument("--sw-weight", type=float, default=0.1, help="w of the omniquant-sw variant")
    p.add_argument("--sw-projections", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=4, help="windows per evaluation split")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-weights", choices=("packed", "dense"), default="packed",
                   help="evaluate through QuantLinear (packed) or dense dequantized weights")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--output", default=None, help="also write the markdown table here")
    p.add_argument("--json", default=None, help="also write every number and block log here")
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


def quant_config(method: str, bits: int, group_size: int, seed: int, args) -> lowbit.QuantConfig:
    if method == "rtn":
        return lowbit.QuantConfig(method="rtn", bits=bits, group_size=group_size, progress=False)
    aug = {"default": None, "on": True, "off": False}[args.aug_loss]
    return lowbit.QuantConfig(
        method="omniquant", bits=bits, group_size=group_size, seed=seed,
        nsamples=args.nsamples, seqlen=args.seqlen, epochs=args.epochs, lr={"clip": args.lr},
        aug_loss=aug, sw_weight=args.sw_weight if method == "omniquant-sw" else 0.0,
        sw_projections=args.sw_projections, progress=False,
    )


def run(args) -> dict:
    run_started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [s for s in args.settings.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m}; choose from {METHODS}")
    model_dir = assets.smollm2_dir()
    _, tokenizer = assets.load_model()
    calibration_stream = token_stream(tokenizer, assets.load_texts("sotu", "calibration"))
    streams = {split: token_stream(tokenizer, assets.load_texts(split, "evaluation")) for split in SPLITS}
    results = []

    def record(setting, method, seed, ppl, seconds=None, peak=None, report=None):
        row = {"setting": setting, "method": method, "seed": seed, **ppl,
               "calibration_s": seconds, "peak_rss_gb": None if peak is None else peak / 2**30}
        if report is not None:
            row["report"] = report.to_dict()
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)

    if "fp" in methods:
        model, _ = assets.load_model()
        record("-", "fp", None, evaluate(model, streams, args))
    for setting in settings:
        bits, group_size = SETTINGS[setting]
        for method in methods:
            if method == "fp":
                continue
            for seed in ([None] if method == "rtn" else seeds):
                model, _ = assets.load_model()
                config = quant_config(method, bits, group_size, seed or 0, args)
                tokens = None
                if method != "rtn":
                    tokens = sample_windows(calibration_stream, args.nsamples, args.seqlen, seed)
                with PeakRSS() as memory:
                    started = time.perf_counter()
                    report = lowbit.quantize(model, config, tokens)
                    seconds = time.perf_counter() - started
                record(setting, method, seed, evaluate(model, streams, args), seconds, memory.peak, report)
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


def gap_recovered(results, setting, split) -> list[float]:
    """Per seed: (ppl_mse - ppl_sw) / (ppl_mse - ppl_fp), in percent."""
    fp = [r[split] for r in results if r["method"] == "fp"]
    if not fp:
        return []
    mse = {r["seed"]: r[split] for r in results if r["setting"] == setting and r["method"] == "omniquant"}
    sw = {r["seed"]: r[split] for r in results if r["setting"] == setting and r["method"] == "omniquant-sw"}
    return [100 * (mse[s] - sw[s]) / (mse[s] - fp[0]) for s in sorted(mse) if s in sw]


def table(run_result: dict) -> str:
    results, args, meta = run_result["results"], run_result["args"], run_result["meta"]
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, {meta['threads']} threads, "
        f"CPU kernel {meta['cpu_isa']}, whole run {meta['wall_s'] / 60:.1f} min, evaluation through "
        + ("QuantLinear (packed kernels)" if args["eval_weights"] == "packed" else "dense dequantized weights")
        + ".  ",
        f"Calibration: {args['nsamples']} windows x {args['seqlen']} tokens of SOTU speeches before 2000, "
        f"{args['epochs']} epochs per block, batch 1, AdamW lr {args['lr']} on the clip logits, "
        f"aug_loss {args['aug_loss']}; SW variant w = {args['sw_weight']}, L = {args['sw_projections']}; "
        f"seeds {args['seeds']}.  ",
        f"Evaluation: first {args['eval_windows']} windows x {args['eval_seqlen']} tokens of each split "
        "(wiki: last 3,000 Wikipedia extracts; sotu: speeches from 2000 on).",
        "",
        "| setting | method | wiki PPL | sotu PPL | calibration (s) | peak RSS (GB) |",
        "|---|---|---|---|---|---|",
    ]
    keys = []
    for r in results:
        if (r["setting"], r["method"]) not in keys:
            keys.append((r["setting"], r["method"]))
    for setting, method in keys:
        rows = [r for r in results if r["setting"] == setting and r["method"] == method]
        lines.append(
            f"| {setting} | {method} | {fmt([r['wiki'] for r in rows])} | {fmt([r['sotu'] for r in rows])} "
            f"| {fmt([r['calibration_s'] for r in rows], 0)} | {fmt([r['peak_rss_gb'] for r in rows])} |"
        )
    gap_lines = []
    for setting in dict.fromkeys(r["setting"] for r in results if r["setting"] != "-"):
        for split in SPLITS:
            shares = gap_recovered(results, setting, split)
            if shares:
                mean, std = mean_std(shares)
                gap_lines.append(
                    f"| {setting} | {split} | {mean:+.1f} % | {std:.1f} % | "
                    + ", ".join(f"{s:+.1f}" for s in shares) + " |"
                )
    if gap_lines:
        lines += [
            "",
            "Share of the full-precision-to-omniquant (MSE) perplexity gap recovered by adding the SW term, "
            "(PPL_mse - PPL_sw) / (PPL_mse - PPL_fp), per seed (positive: SW helps):",
            "",
            "| setting | split | mean | std | per seed |",
            "|---|---|---|---|---|",
        ] + gap_lines
    per_seed = [r for r in results if r["method"].startswith("omniquant")]
    if per_seed:
        lines += ["", "Per seed:", "", "| setting | method | seed | wiki PPL | sotu PPL | calibration (s) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['method']} | {r['seed']} | {r['wiki']:.2f} | {r['sotu']:.2f} "
                  f"| {r['calibration_s']:.0f} |" for r in per_seed]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
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
