"""`lowbit info`: what a checkpoint holds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lowbit.cli.common import FORMATTER


def add_parser(sub, common) -> None:
    p = sub.add_parser("info", parents=[common], formatter_class=FORMATTER,
                       help="what a checkpoint holds",
                       description="Format, method and settings, quantized and full-precision layers, "
                                   "overrides, weight files and tokenizer of a lowbit checkpoint (also "
                                   "GPTQ and full-precision model directories). Reads no tensor data.",
                       epilog="examples:\n  lowbit info ./smollm2-135m-w3g64\n  lowbit info ./smollm2-135m-w3g64 --json")
    p.add_argument("path", metavar="DIR", help="a model directory")
    p.add_argument("--json", action="store_true", help="print lowbit.checkpoint_info's dictionary as JSON")
    p.set_defaults(run=run)


def _describe_method(config: dict[str, Any]) -> str:
    keys = ("nsamples", "seqlen", "epochs", "lr", "sw_weight", "aug_loss", "saliency", "init", "e2e_epochs", "seed")
    parts = []
    for key in keys:
        value = config.get(key)
        unset = value is None or value == {} or (key == "e2e_epochs" and not value)
        if unset or (value is False and key != "aug_loss"):
            continue
        if isinstance(value, dict):
            value = ",".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in value.items())
        parts.append(f"{key} {value}")
    return ", ".join(parts)


def _describe_override(setting: dict[str, Any] | None) -> str:
    if setting is None:
        return "full precision"
    return ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in setting.items()) or "default"


def run(args: argparse.Namespace) -> int:
    from lowbit.io.info import checkpoint_info

    info = checkpoint_info(Path(args.path).expanduser())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [("path", info["path"]), ("format", info["format"]), ("architecture", info["architecture"])]
    if info.get("method"):
        method = info["method"]
        details = _describe_method(info.get("method_config") or {})
        rows.append(("method", f"{method} ({details})" if details else method))
    if "quantized_modules" in info:
        schemes = info.get("schemes") or {f"{info['bits']}-bit g{info['group_size']}": info["quantized_modules"]}
        by_count = sorted(schemes.items(), key=lambda item: -item[1])
        rows.append(("quantized", f"{info['quantized_modules']} linear layers: "
                     + ", ".join(f"{scheme} x{n}" for scheme, n in by_count)))
    if info.get("adapters"):
        rows.append(("adapters", f"{sum(info['adapters'].values())} layers: "
                     + ", ".join(f"{kind} x{n}" for kind, n in info["adapters"].items())))
    if "full_precision_modules" in info:
        rows.append(("full precision", ", ".join(info["full_precision_modules"]) or "none"))
    if info.get("overrides"):
        rows.append(("overrides", "; ".join(f"{pattern} -> {_describe_override(setting)}"
                                            for pattern, setting in info["overrides"])))
    rows.append(("weights", f"{info['weights_bytes'] / 1e6:.1f} MB in {info['weight_files']} file"
                 + ("s" if info["weight_files"] != 1 else "")))
    rows.append(("tokenizer", "saved" if info["tokenizer"] else "none"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return 0
