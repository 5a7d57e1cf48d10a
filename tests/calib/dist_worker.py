"""One rank of a calibration job for the distributed tests (started by `run_ranks` in
test_distributed.py with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, as torchrun
would). Usage: dist_worker.py SETTINGS_JSON OUTPUT; rank 0 writes the quantized model's
tensors to OUTPUT.

SETTINGS_JSON: {"model": a model directory (out of core) or a seed (a tiny Llama in memory),
"tokens_seed" and "nsamples" (random windows) or "tokens_file" (a safetensors file with
"tokens"), "config": QuantConfig fields, "die_at_block": the block at which
rank 1 exits without a word}.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from tiny import random_tokens, tiny_model

import lowbit
from lowbit.calib import distributed, engine


def main(settings: dict, output: str) -> int:
    torch.set_num_threads(1)
    distributed.init_from_environment("cpu", timeout_s=60)
    rank = distributed.world()[0]
    die_at = settings.get("die_at_block")
    if die_at is not None and rank == 1:
        calibrate_block = engine._Run._calibrate_block

        def dying(self, i, streams):
            if i == die_at:
                os._exit(3)
            return calibrate_block(self, i, streams)

        engine._Run._calibrate_block = dying
    if "tokens_file" in settings:
        tokens = load_file(settings["tokens_file"])["tokens"]
    else:
        tokens = random_tokens(settings["nsamples"], 32, seed=settings["tokens_seed"])
    config = lowbit.QuantConfig(**settings["config"])
    try:
        if isinstance(settings["model"], str):
            lowbit.quantize(settings["model"], config, tokens, output=output)
        else:
            model = tiny_model("llama", layers=3, seed=settings["model"])
            lowbit.quantize(model, config, tokens)
            if rank == 0:
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, output)
    except lowbit.LowbitError as exc:
        print(f"rank {rank}: {exc}", file=sys.stderr)
        distributed.shutdown(1, failed=True)
        return 1
    except BaseException:
        distributed.shutdown(1, failed=True)
        raise
    distributed.shutdown(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1]), sys.argv[2]))
