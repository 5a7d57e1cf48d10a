"""`lowbit export`: a lowbit checkpoint in the GPTQ v2 format."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.cli.common import FORMATTER, activity, check_writable, info_line, one_line, path_arg
from lowbit.errors import UsageError


def add_parser(sub, common) -> None:
    p = sub.add_parser("export", parents=[common], formatter_class=FORMATTER,
                       help="convert a lowbit checkpoint to the GPTQ v2 format",
                       description="Writes a lowbit checkpoint in the GPTQ v2 layout (int32-packed codes, "
                                   "true integer zeros, fp16 scales) read by GPTQModel, vLLM and others. "
                                   "Needs integer zero points, which lowbit's rtn and omniquant produce.",
                       epilog="example:\n  lowbit export ./smollm2-135m-w3g64 ./smollm2-135m-w3g64-gptq --format gptq")
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=path_arg, help="a lowbit checkpoint directory")
    p.add_argument("output", metavar="OUTPUT", nargs="?", type=path_arg,
                   help="output directory (default: CHECKPOINT-gptq)")
    p.add_argument("--format", default="gptq", choices=("gptq",), help="default: %(default)s")
    p.add_argument("--dynamic", action="store_true",
                   help="allow layers with their own bits/group size or left in full precision, written "
                        "as GPTQModel's per-module `dynamic` table (read by GPTQModel and vLLM)")
    p.add_argument("--merge-adapters", action="store_true",
                   help="fold the low-rank adapters of an apiq checkpoint into the codes first "
                        "(GPTQ cannot store adapters; rounding them loses part of what they learned)")
    p.set_defaults(run=run)


def _require_lowbit_checkpoint(path: Path) -> dict[str, Any]:
    from lowbit.io.info import checkpoint_info

    info = checkpoint_info(path)
    if not info["format"].startswith("lowbit"):
        raise UsageError(f"{path} is a {info['format']} model, not a lowbit checkpoint")
    return info


def run(args: argparse.Namespace) -> int:
    from lowbit.io.checkpoint import load_quantized, load_tokenizer
    from lowbit.io.gptq import export_gptq
    from lowbit.io.info import checkpoint_info
    from lowbit.nn import merge_adapters

    source = args.checkpoint
    default = source.resolve()  # `lowbit export .` is named after the directory, not "."
    output = args.output if args.output is not None else default.with_name(default.name + "-gptq")
    if output.resolve() == source.resolve():
        raise UsageError("the export must go to another directory than the checkpoint")
    check_writable(output, "output")
    _require_lowbit_checkpoint(source)
    with activity(f"loading {source}"):
        model, tokenizer = load_quantized(source), load_tokenizer(source)
    if args.merge_adapters:
        merged = merge_adapters(model)
        info_line(f"merged the low-rank adapters of {len(merged)} layers into their codes")
    try:
        with activity(f"writing {output}"):
            export_gptq(model, output, tokenizer, dynamic=args.dynamic)
    except ValueError as exc:
        message = one_line(exc).replace("Pass dynamic=True", "Pass --dynamic")
        raise UsageError(message.replace("lowbit.merge_adapters(model)", "--merge-adapters")) from exc
    info = checkpoint_info(output)
    print(f"wrote {output}: {info['format']}, {info['bits']}-bit group size {info['group_size']}, "
          f"{info['quantized_modules']} layers, {info['weights_bytes'] / 1e6:.1f} MB")
    return 0
