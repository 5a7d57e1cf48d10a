"""A bounded, seeded mutation fuzz of a tiny checkpoint's safetensors header and config.json
on every load path (fuzz_checkpoints.py; run it as a script for a larger count): each case
gives the identical model or lowbit's CheckpointError, never a traceback, a hang or a wrong
load. from_pretrained on a config that no longer names lowbit, or that transformers' own
config parser refuses before lowbit is reached, is transformers' own outcome."""

import os

from fuzz_checkpoints import GOOD, LOADERS, TRANSFORMERS_OWN, fuzz

CASES = int(os.environ.get("LOWBIT_FUZZ_CASES", "12"))
SEED = int(os.environ.get("LOWBIT_FUZZ_SEED", "0"))


def test_mutated_checkpoints_load_identically_or_fail_cleanly_on_every_path():
    result = fuzz(CASES, SEED)
    assert result["bad"] == [], result
    for loader in LOADERS:
        counts = result["counts"][loader]
        assert sum(counts.values()) == CASES, (loader, counts)
        assert counts.get("clean error", 0) > 0, (loader, counts)  # the mutations do reach the checks
        allowed = {*GOOD, *TRANSFORMERS_OWN} if loader == "from_pretrained" else set(GOOD)
        assert set(counts) <= allowed, (loader, counts)
