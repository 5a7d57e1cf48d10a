"""Quality of partial retraining (apiq, with saliency and SW) and adaptive rounding
(tesseraq, with SW) next to rtn and omniquant, under one small CPU budget.

SmolLM2-135M-Instruct (lowbit.io.assets), every linear layer of the decoder blocks
quantized (embeddings and lm_head stay in full precision), calibrated on State of
the Union speeches before 2000, evaluated on the two held-out splits (the last
3,000 Wikipedia extracts; the speeches from 2000 on) through dense dequantized
weights with the adapters folded in (the same function as the QuantLinear layers;
fast where the packed CPU kernel is the scalar one). Rows, selected with --rows:

  rtn            round-to-nearest, min-max
  omniquant      learnable clipping
  apiq           clipping + rank-64 adapters (aug_loss on)
  apiq-sal       apiq + saliency regularizer, stages wpt then opt
  apiq-sal-sw    apiq-sal with the SW term
  tesseraq       progressive adaptive rounding from learnt clipping
  tesseraq-sw    tesseraq with the SW term

All calibrated rows of one seed share their calibration windows. The saliency
(diagonal empirical Fisher) is computed once, on its own windows of the
calibration split, and its time is reported. With --merge, the apiq rows are also
evaluated after `merge_and_requantize` (pure low-bit models). The quantized rows
run in `--workers` processes of `--worker-threads` threads each (two one-thread
processes get more out of two cores than one two-thread process).

Prints and writes a markdown table: perplexity mean +- standard deviation over
seeds, calibration time, and the share of the perplexity gap to full precision that
saliency (apiq -> apiq-sal) and SW (apiq-sal -> apiq-sal-sw, tesseraq ->
tesseraq-sw) recover, per seed. Run under the shared lock:

    flock /tmp/lowbit-cpu.lock python bench/retraining_quality.py
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lowbit  # noqa: E402
from lowbit.calib.blocks import decoder_blocks  # noqa: E402
from lowbit.calib.data import token_stream  # noqa: E402
from lowbit.calib.seeds import derive_seed  # noqa: E402
from lowbit.eval.perplexity import token_perplexity  # noqa: E402
from lowbit.io import assets  # noqa: E402
from lowbit.nn.convert import dense_weights  # noqa: E402
from lowbit.nn.modules import linear_layers  # noqa: E402
from quality import fmt, mean_std, metadata  # noqa: E402  (bench/ is on the path of a script in it)

SETTINGS = {"w2g64": (2, 64), "w3g64": (3, 64), "w4g64": (4, 64)}
ROWS = ("rtn", "omniquant", "apiq", "apiq-sal", "apiq-sal-sw", "tesseraq", "tesseraq-sw")
EXTRA_ROWS = ("apiq-uni",)  # apiq-sal's stages with S = 1: does the saliency matter?
SPLITS = ("wiki", "sotu")
# (base row, improved row, what is added): the gap-recovery comparisons
GAINS = (("apiq", "apiq-sal", "saliency"), ("apiq-sal", "apiq-sal-sw", "SW"), ("tesseraq", "tesseraq-sw", "SW"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="w2g64,w3g64")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {','.join(ROWS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--nsamples", type=int, default=4, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--epochs", type=int, default=2, help="epochs per block (omniquant, apiq)")
    p.add_argument("--clip-lr", type=float, default=0.1, help="lr of the clip logits (all methods)")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1, help="apiq's weight decay (clip and lora)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--stages", default="wpt=4,opt=2", help="apiq-sal stage epochs")
    p.add_argument("--reg-lambda", type=float, default=1.0)
    p.add_argument("--reg-variant", default="before_lora")
    p.add_argument("--saliency-windows", type=int, default=16)
    p.add_argument("--saliency-seqlen", type=int, default=256)
    p.add_argument("--tq-lwc-epochs", type=int, default=1, help="tesseraq's clipping epochs")
    p.add_argument("--tq-thresholds", default="0.5,0.25,0.1,0.03")
    p.add_argument("--tq-steps", type=int, default=3, help="steps per PAR stage")
    p.add_argument("--tq-lr", type=float, default=5e-3, help="lr of the rounding variables and scale logits")
    p.add_argument("--sw-weight", type=float, default=0.1)
    p.add_argument("--sw-projections", type=int, default=128)
    p.add_argument("--merge", default="same,minmax", help="comma list of same,minmax: also evaluate merged apiq models")
    p.add_argument("--merge-seeds", default="0", help="seeds whose apiq models are also evaluated merged")
    p.add_argument("--eval-windows", type=int, default=3, help="windows per evaluation split")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the parent")
    p.add_argument("--workers", type=int, default=2, help="processes sharing the quantized rows")
    p.add_argument("--worker-threads", type=int, default=1)
    p.add_argument("--worker-jobs", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "retraining_quality.md"))
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def windows(stream: torch.Tensor, n: int, seqlen: int, seed: int, purpose: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derive_seed(seed, purpose))
    starts = torch.randint(0, stream.numel() - seqlen, (n,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def evaluate(model, streams, args) -> dict[str, float]:
    with dense_weights(model):
        return {split: token_perplexity(model, stream, args.eval_seqlen, args.eval_windows, progress=False)
                for split, stream in streams.items()}


def row_config(row: str, bits: int, group_size: int, seed: int, args, work: Path) -> lowbit.QuantConfig:
    common = dict(bits=bits, group_size=group_size, seed=seed, nsamples=args.nsamples, seqlen=args.seqlen,
                  sw_projections=args.sw_projections, progress=False)
    sw = args.sw_weight if row.endswith("-sw") else 0.0
    if row == "rtn":
        return lowbit.QuantConfig(method="rtn", bits=bits, group_size=group_size, progress=False)
    if row == "omniquant":
        return lowbit.QuantConfig(method="omniquant", epochs=args.epochs, lr={"clip": args.clip_lr}, **common)
    if row.startswith("apiq"):
        stages, saliency = {}, False
        if "-sal" in row or row == "apiq-uni":
            stages = {k: int(v) for k, v in (item.split("=") for item in args.stages.split(","))}
            saliency = str(work / ("uniform" if row == "apiq-uni" else "saliency"))
        return lowbit.QuantConfig(
            method="apiq", epochs=args.epochs, sw_weight=sw, lora_rank=args.rank, lora_alpha=args.alpha,
            lr={"clip": args.clip_lr, "lora": args.lora_lr},
            weight_decay={"clip": args.weight_decay, "lora": args.weight_decay},
            saliency=saliency, stage_epochs=stages,
            reg_lambda=args.reg_lambda, reg_variant=args.reg_variant, **common,
        )
    if row.startswith("tesseraq"):
        return lowbit.QuantConfig(
            method="tesseraq", sw_weight=sw, stage_epochs={"lwc": args.tq_lwc_epochs},
            rounding_thresholds=tuple(float(t) for t in args.tq_thresholds.split(",")),
            rounding_steps=args.tq_steps, lr={"clip": args.clip_lr, "rounding": args.tq_lr, "scale": args.tq_lr},
            **common,
        )
    raise SystemExit(f"unknown row {row}; choose from {ROWS}")


def jobs_of(args) -> list[tuple[str, str, int | None]]:
    rows = [r for r in args.rows.split(",") if r]
    for r in rows:
        if r not in ROWS + EXTRA_ROWS:
            raise SystemExit(f"unknown row {r}; choose from {ROWS + EXTRA_ROWS}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    return [(setting, row, seed) for setting in args.settings.split(",") if setting
            for row in rows for seed in ([None] if row == "rtn" else seeds)]


def run(args) -> dict:
    """The parent: full precision, saliency, then the quantized rows in worker processes."""
    started_all = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = assets.load_model()
    streams = eval_streams(tokenizer)
    results = [{"setting": "-", "row": "fp", "seed": None, **evaluate(model, streams, args), "calibration_s": None}]
    print(json.dumps(results[0]), flush=True)
    extra = {}
    jobs = jobs_of(args)
    work = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))
    saliency_dir = work / "saliency"
    if any("-sal" in row for _, row, _ in jobs):
        calibration_stream = token_stream(tokenizer, assets.load_texts("sotu", "calibration"))
        started = time.perf_counter()
        lowbit.compute_saliency(
            model, windows(calibration_stream, args.saliency_windows, args.saliency_seqlen, 0, "saliency"),
            out_dir=saliency_dir, progress=False)
        extra["saliency_s"] = time.perf_counter() - started
        print(f"saliency: {extra['saliency_s']:.0f} s", flush=True)
    if any(row == "apiq-uni" for _, row, _ in jobs):
        uniform_saliency(model, work / "uniform")
    del model
    shares = [jobs[k :: args.workers] for k in range(args.workers)]
    procs = []
    for k, share in enumerate(shares):
        if not share:
            continue
        out = work / f"worker{k}.json"
        cmd = [sys.executable, "-u", __file__, *sys.argv[1:], "--worker-jobs", json.dumps(share),
               "--work-dir", str(work), "--threads", str(args.worker_threads), "--json", str(out)]
        procs.append((subprocess.Popen(cmd), out))
    for proc, out in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a worker failed: {proc.args}")
        results += json.loads(out.read_text())["results"]
    extra["total_s"] = time.perf_counter() - started_all
    return {"args": vars(args), "results": results, "extra": extra, "meta": metadata()}


def run_worker(args) -> dict:
    """One worker: quantizes and evaluates its share of (setting, row, seed)."""
    torch.set_num_threads(args.threads)
    _, tokenizer = assets.load_model()
    calibration_stream = token_stream(tokenizer, assets.load_texts("sotu", "calibration"))
    streams = eval_streams(tokenizer)
    work = Path(args.work_dir)
    merges = [m for m in args.merge.split(",") if m]
    results = []

    def record(setting, row, seed, ppl, seconds=None, report=None):
        entry = {"setting": setting, "row": row, "seed": seed, **ppl, "calibration_s": seconds}
        if report is not None:
            entry["blocks"] = [{"index": b.index, "before": b.loss_before, "after": b.loss_after,
                                "epochs": b.epochs} for b in report.blocks]
        results.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "blocks"}), flush=True)

    for setting, row, seed in json.loads(args.worker_jobs):
        bits, group_size = SETTINGS[setting]
        model, _ = assets.load_model()
        config = row_config(row, bits, group_size, seed or 0, args, work)
        tokens = None if row == "rtn" else windows(calibration_stream, args.nsamples, args.seqlen,
                                                  seed, "calibration windows")
        started = time.perf_counter()
        report = lowbit.quantize(model, config, tokens)
        seconds = time.perf_counter() - started
        record(setting, row, seed, evaluate(model, streams, args), seconds, report)
        if row == "apiq" and str(seed) in args.merge_seeds.split(","):
            for grid in merges:
                merged = copy.deepcopy(model)
                lowbit.merge_adapters(merged, grid)
                record(setting, f"apiq merged ({grid})", seed, evaluate(merged, streams, args))
        del model
    return {"results": results}


def eval_streams(tokenizer) -> dict[str, torch.Tensor]:
    return {split: token_stream(tokenizer, assets.load_texts(split, "evaluation")) for split in SPLITS}


def uniform_saliency(model, directory: Path) -> None:
    """S = 1 everywhere: the ablation of saliency (the regularizer becomes the plain
    relative weight error)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, block in enumerate(decoder_blocks(model)[1]):
        save_file({name: torch.ones(layer.weight.shape) for name, layer in linear_layers(block).items()},
                  str(directory / f"block_{i:04d}.safetensors"))


# --- the table ---------------------------------------------------------------------------


def recovered(results, setting, split, base, improved, scale=lambda p: p) -> list[float]:
    """Per seed: 100 (f(PPL_base) - f(PPL_improved)) / (f(PPL_base) - f(PPL_fp)), with f the
    identity or the log (the mean token loss, in nats)."""
    fp = scale([r[split] for r in results if r["row"] == "fp"][0])
    a = {r["seed"]: scale(r[split]) for r in results if r["setting"] == setting and r["row"] == base}
    b = {r["seed"]: scale(r[split]) for r in results if r["setting"] == setting and r["row"] == improved}
    return [100 * (a[s] - b[s]) / (a[s] - fp) for s in sorted(a) if s in b]


def order(result: dict) -> tuple:
    """Table order: setting, then the row order of ROWS (merged models after apiq), then seed."""
    names = ["fp", *ROWS[:3], "apiq merged (same)", "apiq merged (minmax)", *ROWS[3:], *EXTRA_ROWS]
    setting = result["setting"]
    return (setting != "-", setting, names.index(result["row"]), -1 if result["seed"] is None else result["seed"])


def table(run_result: dict) -> str:
    results, args, meta, extra = run_result["results"], run_result["args"], run_result["meta"], run_result["extra"]
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, {meta['threads']} threads; "
        f"{args['workers']} worker processes x {args['worker_threads']} thread(s); "
        f"whole run {extra['total_s'] / 60:.1f} min"
        + (f", saliency {extra['saliency_s']:.0f} s" if "saliency_s" in extra else "") + ".  ",
        f"Budget: {args['nsamples']} windows x {args['seqlen']} tokens of SOTU speeches before 2000 per seed "
        f"(seeds {args['seeds']}), batch 1. omniquant and apiq {args['epochs']} epochs per block, clip lr "
        f"{args['clip_lr']}; apiq rank {args['rank']}, alpha {args['alpha']}, lora lr {args['lora_lr']}, "
        f"weight decay {args['weight_decay']}, aug_loss on; apiq-sal stages {args['stages']}, lambda "
        f"{args['reg_lambda']}, {args['reg_variant']}, saliency from {args['saliency_windows']} x "
        f"{args['saliency_seqlen']} other windows of the same split; tesseraq {args['tq_lwc_epochs']} clipping "
        f"epoch(s) then PAR thresholds {args['tq_thresholds']} x {args['tq_steps']} steps, lr {args['tq_lr']}; "
        f"SW w = {args['sw_weight']}, L = {args['sw_projections']}.  ",
        f"Evaluation: first {args['eval_windows']} windows x {args['eval_seqlen']} tokens of each split "
        "(wiki: last 3,000 Wikipedia extracts; sotu: speeches from 2000 on), dense dequantized weights "
        "with the adapters folded in.",
        "",
        "| setting | method | wiki PPL | sotu PPL | calibration (s) |",
        "|---|---|---|---|---|",
    ]
    results = sorted(results, key=order)
    keys = list(dict.fromkeys((r["setting"], r["row"]) for r in results))
    for setting, row in keys:
        rs = [r for r in results if r["setting"] == setting and r["row"] == row]
        lines.append(f"| {setting} | {row} | {fmt([r['wiki'] for r in rs])} | {fmt([r['sotu'] for r in rs])} "
                     f"| {fmt([r['calibration_s'] for r in rs], 0)} |")
    gain_lines = []
    for setting in dict.fromkeys(r["setting"] for r in results if r["setting"] != "-"):
        for base, improved, what in GAINS:
            for split in SPLITS:
                for label, f in (("PPL", lambda p: p), ("log PPL", math.log)):
                    shares = recovered(results, setting, split, base, improved, f)
                    if shares:
                        mean, std = mean_std(shares)
                        gain_lines.append(
                            f"| {setting} | {what}: {base} -> {improved} | {split} | {label} | {mean:+.1f} % "
                            f"| {std:.1f} % | " + ", ".join(f"{x:+.1f}" for x in shares) + " |")
    if gain_lines:
        lines += ["", "Share of the gap to full precision recovered, 100 (f(base) - f(new)) / (f(base) - f(fp)) "
                  "with f = PPL or log PPL (the mean token loss), per seed (positive: the addition helps):", "",
                  "| setting | addition | split | f | mean | std | per seed |",
                  "|---|---|---|---|---|---|---|"] + gain_lines
    per_seed = [r for r in results if r["seed"] is not None]
    if per_seed:
        lines += ["", "Per seed:", "", "| setting | method | seed | wiki PPL | sotu PPL | calibration (s) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['row']} | {r['seed']} | {r['wiki']:.2f} | {r['sotu']:.2f} | "
                  + ("-" if r["calibration_s"] is None else f"{r['calibration_s']:.0f}") + " |" for r in per_seed]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.worker_jobs:
        Path(args.json).write_text(json.dumps(run_worker(args), default=str))
        return
    result = run(args)
    text = table(result)
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
