"""`lowbit eval`: perplexity of a checkpoint or a full-precision model."""

from __future__ import annotations

import argparse

from lowbit.calib.data import token_stream
from lowbit.cli.common import (
    DATA_HELP,
    EVAL_SEQLEN,
    EVAL_WINDOWS,
    FORMATTER,
    NAMED_TEXTS,
    add_model_source,
    int_at_least,
    load_any,
    load_texts,
    resolve_device,
    window_count,
)
from lowbit.errors import UsageError
from lowbit.eval.perplexity import token_perplexity
from lowbit.io import assets


def add_parser(sub, common) -> None:
    p = sub.add_parser("eval", parents=[common], formatter_class=FORMATTER,
                       help="perplexity of a checkpoint or a full-precision model",
                       description="Perplexity (GPTQ convention: texts joined by blank lines, tokenized "
                                   "without BOS, non-overlapping windows) of a model on a text.",
                       epilog="examples:\n  lowbit eval ./smollm2-135m-w3g64\n"
                              "  lowbit eval smollm2 --data sotu --max-windows 0\n"
                              "  lowbit eval ./my-llama --data notes.txt --seqlen 2048")
    add_model_source(p, "the model")
    p.add_argument("--data", default="wiki", help=f"{DATA_HELP} (default: wiki)")
    p.add_argument("--split", default="evaluation", choices=assets.SPLITS,
                   help="split of a named text (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=EVAL_SEQLEN, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-windows", type=int_at_least(0), default=EVAL_WINDOWS,
                   help="score the first N windows, 0 for all (default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {args.seqlen}")
    model, tokenizer, kind = load_any(args.model, device, args.tokenizer)
    stream = token_stream(tokenizer, load_texts([args.data], args.split))
    windows = window_count(stream, args.seqlen, args.max_windows)
    ppl = token_perplexity(model, stream, args.seqlen, args.max_windows or None)
    split = f" ({args.split} split)" if args.data in NAMED_TEXTS else ""
    print(f"{args.model} ({kind}): perplexity {ppl:.3f} on {args.data}{split}, "
          f"{windows} windows x {args.seqlen} tokens ({windows * (args.seqlen - 1)} predicted tokens)")
    return 0
