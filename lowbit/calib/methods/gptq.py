"""GPTQ as a method, and as the starting point of the methods that train on its grid.

`gptq`: every linear layer of a block gets a ClippedLinear stand-in whose grid is fixed
(min-max, or the per-group range shrink with the least diag(H)-weighted rounding error
when clip_search is on) and whose weight is then compensated column by column
(lowbit.calib.gptq); nothing is trained. Its export is the QuantLinear of those codes.

`init="gptq"` in omniquant, apiq and tesseraq runs the same compensation on their
stand-ins before training (on their initial clipping, searched as above), so that the
clipping, adapters and rounding are trained from GPTQ's codes, scales and zeros; the
compensated weight is what the stand-ins round from then on.

Defaults (GPTQ's paper and code): 128 windows x 2048 tokens, dampening 0.01 of the mean
diagonal, lazy updates of 128 columns, act-order with static groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lowbit.calib.gptq import GPTQOptions, compensate_block
from lowbit.calib.methods.base import LayerSpec, Method
from lowbit.calib.methods.lwc import ClippedLinear
from lowbit.errors import UsageError

INITS = ("rtn", "gptq")
MINMAX_LOGIT = 100.0  # sigmoid(100) = 1 in float32: the whole range of each group


def check_init(value: str | None) -> None:
    if value not in (None, *INITS):
        raise UsageError(f"lowbit: init must be one of {INITS}, got {value!r}")


def check_gptq_options(damp, block_size) -> None:
    if damp is not None and not (isinstance(damp, (int, float)) and 0 < damp < 1e3):
        raise UsageError(f"lowbit: damp must be a number in (0, 1000), got {damp!r}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise UsageError(f"lowbit: block_size must be an integer >= 1, got {block_size!r}")


def block_name_of(specs: dict[str, LayerSpec]) -> str:
    """The block's name in the model, from the full name of one of its layers."""
    local, spec = next(iter(specs.items()))
    return spec.name[: -len(local) - 1]


class StartsFromGPTQ:
    """Mixin of the Methods whose stand-ins are ClippedLinears: with the setting
    init="gptq", `fit` compensates them before training."""

    def compensates(self) -> bool:
        return self.config.init == "gptq"

    def gptq_options(self) -> GPTQOptions:
        return GPTQOptions()

    def fit(self, run_block: Callable[[], object]) -> None:
        if self.compensates():
            compensate_block(self.wrappers, run_block, self.gptq_options(), block_name_of(self.specs))


@dataclass
class GPTQSettings:
    """gptq's own settings (None: the default).

    damp          added to diag(H), relative to its mean (0.01); raised x10 with a
                  warning while H is not positive definite.
    block_size    columns per lazy batch update (128); does not change the result
                  beyond floating-point rounding.
    act_order     quantize the columns by decreasing diag(H) (True), grid static.
    clip_search   per group, the range shrink with the least diag(H)-weighted rounding
                  error (True); False: min-max.
    """

    damp: float | None = None
    block_size: int | None = None
    act_order: bool | None = None
    clip_search: bool | None = None

    def __post_init__(self):
        check_gptq_options(self.damp, self.block_size)
        for name in ("act_order", "clip_search"):
            if getattr(self, name) not in (None, True, False):
                raise UsageError(f"lowbit: {name} must be true or false, got {getattr(self, name)!r}")


class GPTQ(StartsFromGPTQ, Method):
    name = "gptq"
    Settings = GPTQSettings

    @classmethod
    def defaults(cls, config):
        return {
            "nsamples": 128,
            "seqlen": 2048,
            "epochs": 0,
            "aug_loss": False,
            "lr": {},
            "weight_decay": {},
            "damp": 0.01,
            "block_size": 128,
            "act_order": True,
            "clip_search": True,
        }

    @classmethod
    def quick(cls, config):
        """The default job: 16 windows and, at 2 and 3 bits, two end-to-end epochs (3 to 6
        minutes of calibration for the default model on a 2-core CPU). At 4 bits the stage made W4g64
        worse (wiki 16.0 -> 17.5) and W4g192 better (17.0 -> 16.6): not a default there
        (BENCHMARKS.md, "Ablation over three seeds")."""
        return {"nsamples": 16, "seqlen": 512, "e2e_epochs": 2 if config.bits <= 3 else 0}

    def wrap(self, layer: nn.Module, spec: LayerSpec) -> nn.Module:
        return ClippedLinear(layer, spec.bits, spec.group_size, spec.scale_dtype, init=MINMAX_LOGIT,
                             compensated=self.compensates())

    def compensates(self) -> bool:
        return True

    def gptq_options(self) -> GPTQOptions:
        return GPTQOptions(damp=self.config.damp, block_size=self.config.block_size,
                           act_order=self.config.act_order, clip_search=self.config.clip_search)

    def export(self, local_name: str, wrapper: nn.Module) -> nn.Module:
        return wrapper.to_quant_linear()
