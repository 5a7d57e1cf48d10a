"""`lowbit eval`: perplexity of a checkpoint or a full-precision model and, against a
reference model, KL divergence, top-1 agreement and the perplexity ratio."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbit._version import library_version, library_versions
from lowbit.calib.data import token_stream
from lowbit.cli.common import (
    DATA_HELP,
    EVAL_SEQLEN,
    EVAL_WINDOWS,
    FORMATTER,
    NAMED_TEXTS,
    add_model_source,
    dtype_arg,
    int_at_least,
    load_any,
    load_texts,
    resolve_device,
)
from lowbit.errors import UsageError
from lowbit.eval.perplexity import Evaluation, evaluate_tokens
from lowbit.io import assets


def add_parser(sub, common) -> None:
    p = sub.add_parser("eval", parents=[common], formatter_class=FORMATTER,
                       help="perplexity of a checkpoint or a full-precision model; KL divergence from a reference",
                       description="Perplexity (GPTQ convention: texts joined by blank lines, tokenized "
                                   "without BOS, non-overlapping windows) of a model on a text. With "
                                   "--reference (the full-precision model), on the same windows: KL(reference "
                                   "|| model) of the next-token distributions per predicted token (mean, median, "
                                   "99th percentile, in nats), top-1 agreement (how often both rank the same "
                                   "token first) and the perplexity ratio.",
                       epilog="examples:\n  lowbit eval ./smollm2-135m-w3g64\n"
                              "  lowbit eval ./smollm2-135m-w3g64 --reference smollm2\n"
                              "  lowbit eval smollm2 --data sotu --max-windows 0\n"
                              "  lowbit eval ./my-llama --data notes.txt --seqlen 2048 --json")
    add_model_source(p, "the model")
    p.add_argument("--data", default="wiki", help=f"{DATA_HELP} (default: wiki)")
    p.add_argument("--split", default="evaluation", choices=assets.SPLITS,
                   help="split of a named text (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=EVAL_SEQLEN, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-windows", type=int_at_least(0), default=EVAL_WINDOWS,
                   help="score the first N windows, 0 for all (default: %(default)s)")
    p.add_argument("--reference", metavar="MODEL",
                   help="compare with this model (e.g. the full-precision one the checkpoint was made from): "
                        "KL divergence, top-1 agreement, perplexity ratio")
    g = p.add_argument_group("lm-evaluation-harness (pip install lm_eval)")
    g.add_argument("--tasks", type=task_list, metavar="TASK[,TASK...]",
                   help="run these lm-eval tasks on the loaded model instead of the perplexity")
    g.add_argument("--tasks-path", metavar="DIR", help="a directory of task YAML files of your own (no Python code)")
    g.add_argument("--limit", type=int_at_least(1), help="at most this many examples per task")
    g.add_argument("--num-fewshot", type=int_at_least(0), help="examples in each prompt (default: the task's)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object, with the versions "
                                                       "of the libraries that produced them")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.tasks:
        return run_harness(args, device)
    texts = load_texts([args.data], args.split)  # a bad --data fails before any model loads
    model, tokenizer, kind = load_any(args.model, device, args.tokenizer, dtype=dtype_arg(args))
    reference = load_reference(args.reference, model, device) if args.reference else None
    stream = token_stream(tokenizer, texts)
    evaluation = evaluate_tokens(model, stream, args.seqlen, args.max_windows or None, reference=reference)
    if args.json:
        print(json.dumps({"model": args.model, "kind": kind, "reference": args.reference, "data": args.data,
                          "split": args.split if args.data in NAMED_TEXTS else None,
                          **evaluation.to_dict(), "versions": library_versions()}, indent=2))
    else:
        print(describe(evaluation, args, kind))
    return 0


def task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError(f"expected task names separated by commas, got {text!r}")
    return tasks


def run_harness(args: argparse.Namespace, device: str) -> int:
    """lm-eval tasks on the model as loaded here (a lowbit checkpoint needs no loading by lm-eval)."""
    from lowbit.eval.harness import refuse_task_code, results_table, run_tasks

    if args.reference:
        raise UsageError("--reference compares perplexities and next-token distributions; it does not apply "
                         "to --tasks")
    if args.tasks_path:
        refuse_task_code(Path(args.tasks_path).expanduser())  # before the model loads
    model, tokenizer, kind = load_any(args.model, device, args.tokenizer, dtype=dtype_arg(args))
    results = run_tasks(model, tokenizer, args.tasks, include_path=args.tasks_path, limit=args.limit,
                        num_fewshot=args.num_fewshot)
    if args.json:
        print(json.dumps({"model": args.model, "kind": kind, "results": results["results"],
                          "versions": {**library_versions(), "lm_eval": library_version("lm_eval")}},
                         indent=2, default=str))
    else:
        print(f"{args.model} ({kind}):\n{results_table(results)}")
    return 0


def load_reference(source: str, model, device: str):
    """The reference model; it must predict over the same vocabulary as `model`."""
    reference, _, _ = load_any(source, device, need_tokenizer=False)
    vocabularies = model.config.vocab_size, reference.config.vocab_size
    if vocabularies[0] != vocabularies[1]:
        raise UsageError(f"--reference {source} predicts {vocabularies[1]} tokens, the model {vocabularies[0]}: "
                         "compare a checkpoint with the model it was made from")
    return reference


def describe(evaluation: Evaluation, args: argparse.Namespace, kind: str) -> str:
    split = f" ({args.split} split)" if args.data in NAMED_TEXTS else ""
    windows = evaluation.windows
    text = (f"{args.model} ({kind}): perplexity {evaluation.perplexity:.3f} on {args.data}{split}, "
            f"{windows} windows x {args.seqlen} tokens ({windows * (args.seqlen - 1)} predicted tokens)")
    if evaluation.reference_perplexity is not None:
        text += (f"\n  against {args.reference}: perplexity {evaluation.reference_perplexity:.3f} (ratio "
                 f"{evaluation.perplexity_ratio:.3f}); KL divergence {evaluation.kl_mean:.4f} nats (median "
                 f"{evaluation.kl_median:.4f}, p99 {evaluation.kl_p99:.3f}); top-1 agreement "
                 f"{100 * evaluation.top1_agreement:.2f} %")
    return text
