"""`checkpoint_info`: what a model directory holds, read from its config and file sizes
(no tensor data), for lowbit, GPTQ and full-precision directories alike."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lowbit.io.checkpoint import check_checkpoint, tokenizer_files
from lowbit.io.files import read_json_file
from lowbit.io.gptq import check_gptq_checkpoint
from lowbit.io.validate import QUANT_METHOD, check_directory, read_model_config


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint directory holds, read from its config and file sizes (no tensor data):
    for lowbit and GPTQ checkpoints alike, the base for `lowbit info`."""
    path = Path(path)
    config = read_model_config(path)
    check_directory(path)
    qc = getattr(config, "quantization_config", None)
    if not isinstance(qc, Mapping) and os.path.lexists(path / "quantize_config.json"):
        qc = read_json_file(path, "quantize_config.json")
    files = sorted(path.glob("*.safetensors"))
    info: dict[str, Any] = {
        "path": str(path),
        "architecture": (getattr(config, "architectures", None) or [config.model_type])[0],
        "weights_bytes": sum(f.stat().st_size for f in files),
        "weight_files": len(files),
        "tokenizer": bool(tokenizer_files(path)),
    }
    if isinstance(qc, Mapping) and qc.get("quant_method") == QUANT_METHOD:
        _, qc, _ = check_checkpoint(path)
        schemes = Counter(f"{s['bits']}-bit g{s['group_size']}" for s in qc["modules"].values())
        adapters = Counter(
            f"rank {a['rank']} {a['dtype']}" for s in qc["modules"].values() if (a := s.get("adapter"))
        )
        info.update(
            format=f"lowbit v{qc['format_version']}",
            method=qc.get("method"),
            bits=qc.get("bits"),
            group_size=qc.get("group_size"),
            quantized_modules=len(qc["modules"]),
            schemes=dict(schemes),
            adapters=dict(adapters),
            full_precision_modules=list(qc.get("modules_to_not_convert") or []),
            overrides=qc.get("overrides") or [],
            method_config=qc.get("method_config") or {},
        )
    elif isinstance(qc, Mapping) and qc.get("quant_method", "gptq") == "gptq" and "bits" in qc:
        _, qc, _, layers = check_gptq_checkpoint(path)
        info.update(
            format=str(qc.get("checkpoint_format") or qc.get("format") or "gptq"),
            method="gptq",
            bits=qc.get("bits"),
            group_size=qc.get("group_size"),
            desc_act=qc.get("desc_act"),
            quantized_modules=len(layers),
        )
    else:
        info.update(format="full precision" if qc is None else str(qc.get("quant_method")))
    return info
