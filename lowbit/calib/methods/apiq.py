"""ApiQ partial retraining, and its saliency-aware variant.

ApiQ-bw: every quantized linear layer of a block gets learnable weight clipping (as
`omniquant`) plus a low-rank adapter, effective weight Q(W) + (alpha / r) B A, with
A Kaiming-uniform and B = 0 so training starts from the quantized block. Clipping
and adapters are trained jointly on the block loss against both targets (aug_loss
on), with their own learning rates and weight decays; the original weights stay
frozen. The exported layer is a QuantLinear with the adapter beside the packed
weight (`QuantLinear.attach_adapter`), stored in the scale dtype (fp16 by default).

Saliency-aware partial retraining (`saliency` set) adds, for block i,

    R_i = sum_l sum_jk S_l[j,k] (W^_l[j,k] - W_l[j,k])^2 / sum_l sum_jk S_l[j,k] W_l[j,k]^2

over the block's linear layers l, with S the diagonal empirical Fisher of the
language-model loss (`lowbit.compute_saliency`) and W^ = Q(W) ("before_lora") or
Q(W) + (alpha / r) B A ("after_lora"). The numerator is the paper's regularizer;
dividing by the same saliency-weighted sum of W^2 makes R the saliency-weighted
relative squared weight error, independent of the scale of S (which varies with the
model, the data and the number of windows) and of the weights: R = 0 for W^ = W,
R = 1 for W^ = 0, about 0.01-0.3 for 2- to 4-bit grids. It enters with weight
lambda_i = reg_lambda * reg_growth^i, in the paper's stages:

    wpt     weight preservation   lambda_i R            (with before_lora: clipping only)
    mixedt  mixed                 block loss + lambda_i R
    opt     output preservation   block loss            (plain ApiQ)

Defaults (ApiQ's published recipe): 128 windows x 2048 tokens, 20 epochs, batch 1,
aug_loss on, AdamW with lr {"lora": 5e-4, "clip": 5e-3} and weight decay 0.1 for
both, rank 64, alpha 16. With saliency (the paper's README recipe): before_lora,
lambda 1 (in the units above), growth 1, the epochs split as wpt 3/4 and opt 1/4
(15 + 5 of 20). Learning rates and weight decays per stage: lr={"wpt.clip": ...}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.calib.methods.base import LayerSpec, Method, Stage
from lowbit.calib.methods.gptq import StartsFromGPTQ, check_init
from lowbit.calib.methods.lwc import ClippedLinear, check_clip_init
from lowbit.calib.seeds import derive_seed
from lowbit.errors import UsageError, UsageTypeError
from lowbit.nn import QuantLinear, linear_weight

STAGES = ("wpt", "mixedt", "opt")
REG_VARIANTS = ("before_lora", "after_lora")


@dataclass
class ApiQSettings:
    """apiq's own settings (None: the default of `ApiQ.defaults`).

    lora_rank, lora_alpha  the low-rank adapters: rank and scale alpha / rank (64, 16).
    saliency       the saliency regularizer: False (off), True (computed from the
                   calibration windows, under cache_dir if set) or the directory
                   written by `lowbit.compute_saliency`.
    reg_lambda     lambda of the regularizer R (1.0; see the module docstring for the
                   normalisation of R that makes it comparable across models).
    reg_variant    "before_lora" (R on Q(W)) or "after_lora" (on Q(W) + scale B A).
    reg_growth     m: block i uses lambda * m^i (1.0).
    stage_epochs   epochs per stage, e.g. {"wpt": 15, "mixedt": 0, "opt": 5}; missing
                   stages take the default.
    clip_init      the initial clip logits (4.0).
    init           "rtn" (clipping and adapters trained from round-to-nearest) or
                   "gptq" (from GPTQ's codes and searched ranges).
    """

    lora_rank: int | None = None
    lora_alpha: float | None = None
    saliency: bool | str = False
    reg_lambda: float | None = None
    reg_variant: str | None = None
    reg_growth: float | None = None
    stage_epochs: dict[str, int] | None = None
    clip_init: float | None = None
    init: str | None = None

    def __post_init__(self):
        check_init(self.init)
        if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank < 1):
            raise UsageError(f"lowbit: lora_rank must be an integer >= 1, got {self.lora_rank!r}")
        for name in ("lora_alpha", "reg_lambda", "reg_growth"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise UsageError(f"lowbit: {name} must be a finite number >= 0, got {value!r}")
        if self.reg_variant not in (None, *REG_VARIANTS):
            raise UsageError(f"lowbit: reg_variant must be one of {REG_VARIANTS}, got {self.reg_variant!r}")
        if not isinstance(self.saliency, (bool, str)):
            raise UsageTypeError(f"lowbit: saliency must be True, False or a directory, got {self.saliency!r}")
        check_stage_epochs(self.stage_epochs, STAGES, "apiq")
        check_clip_init(self.clip_init)


def check_stage_epochs(stage_epochs: dict[str, int] | None, stages: tuple[str, ...], method: str) -> None:
    """A `stage_epochs` setting: epochs >= 0 for stages the method has."""
    if stage_epochs is None:
        return
    if not isinstance(stage_epochs, dict):
        raise UsageTypeError(f"lowbit: stage_epochs must be a dict of stage -> epochs, got {stage_epochs!r}")
    unknown = sorted(set(stage_epochs) - set(stages))
    if unknown:
        raise UsageError(f"lowbit: {method} has the stages {stages}, not {unknown}")
    for stage, epochs in stage_epochs.items():
        if not isinstance(epochs, int) or epochs < 0:
            raise UsageError(f"lowbit: stage_epochs[{stage!r}] must be an integer >= 0, got {epochs!r}")


class AdaptedLinear(ClippedLinear):
    """A ClippedLinear with a low-rank adapter: y = x Q(W)^T + b + scale * B (A x)."""

    def __init__(self, linear: nn.Module, spec: LayerSpec, rank: int, alpha: float,
                 generator: torch.Generator, clip_init: float = 4.0, compensated: bool = False):
        super().__init__(linear, spec.bits, spec.group_size, spec.scale_dtype, init=clip_init,
                         compensated=compensated)
        out_features, in_features = linear_weight(linear).shape
        device = self.upper.device
        a = torch.empty(rank, in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's and PEFT's init
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.lora_scale = alpha / rank
        # Set by the method when a regularizer is used; not learned state.
        self.register_buffer("saliency", None, persistent=False)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.lora_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return super().forward(x) + low_rank * self.lora_scale

    def weighted_error(self, variant: str) -> torch.Tensor:
        """sum S (W^ - W)^2 of this layer (differentiable)."""
        w_hat = self.fake_weight()
        if variant == "after_lora":
            w_hat = w_hat + self.delta_weight()
        return saliency_penalty(self.saliency, w_hat, linear_weight(self.linear).detach().float())

    def to_quant_linear(self) -> QuantLinear:
        layer = super().to_quant_linear()
        layer.attach_adapter(self.lora_A.shape[0], self.lora_scale * self.lora_A.shape[0],
                             A=self.lora_A.detach(), B=self.lora_B.detach(), dtype=self.scale_dtype)
        return layer

    def lora_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]


def saliency_penalty(saliency: torch.Tensor, w_hat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum S (W^ - W)^2: zero when W^ = W, linear in S."""
    return (saliency * (w_hat - w).square()).sum()


class ApiQ(StartsFromGPTQ, Method):
    name = "apiq"
    Settings = ApiQSettings

    @classmethod
    def defaults(cls, config):
        epochs = config.epochs if config.epochs is not None else 20
        if config.saliency:
            wpt = 3 * epochs // 4
            stage_epochs = {"wpt": wpt, "mixedt": 0, "opt": epochs - wpt}
        else:
            stage_epochs = {"opt": epochs}
        return {
            "nsamples": 128,
            "seqlen": 2048,
            "epochs": 20,
            "aug_loss": True,
            "lr": {"lora": 5e-4, "clip": 5e-3},
            "weight_decay": {"lora": 0.1, "clip": 0.1},
            "lora_rank": 64,
            "lora_alpha": 16.0,
            "reg_lambda": 1.0,
            "reg_variant": "before_lora",
            "reg_growth": 1.0,
            "stage_epochs": stage_epochs,
            "clip_init": 4.0,
            "init": "rtn",
        }

    @classmethod
    def quick(cls, config):
        budget = super().quick(config)
        budget["lr"]["lora"] = 1e-3
        return budget

    @classmethod
    @contextlib.contextmanager
    def prepare(cls, model, tokens, config) -> Iterator:
        """With saliency=True, computes S from the calibration windows: under
        cache_dir/saliency (kept, and resumed) or in a temporary directory."""
        if config.saliency is not True:
            yield config
            return
        from lowbit.calib.saliency import compute_saliency

        with contextlib.ExitStack() as stack:
            if config.cache_dir:
                directory = Path(config.cache_dir).expanduser() / "saliency"
            else:
                directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lowbit-saliency-")))
            compute_saliency(model, tokens, out_dir=directory, progress=config.progress)
            yield dataclasses.replace(config, saliency=str(directory))

    def setup(self, layers):
        wrappers = super().setup(layers)
        if self.config.saliency:
            self._attach_saliency()
        return wrappers

    def _attach_saliency(self) -> None:
        from lowbit.calib.saliency import load_saliency

        saliency = load_saliency(self.config.saliency, self.block_index)
        reference = torch.zeros((), dtype=torch.float64)
        for local, wrapper in self.wrappers.items():
            w = linear_weight(wrapper.linear)
            s = saliency.get(local)
            if s is None or s.shape != w.shape:
                raise UsageError(
                    f"lowbit: the saliency in {self.config.saliency} has no tensor of shape "
                    f"{list(w.shape)} for {self.specs[local].name}"
                )
            wrapper.saliency = s.to(device=w.device, dtype=torch.float32)
            reference += (wrapper.saliency * w.detach().float().square()).sum().double().cpu()
        if not reference > 0:
            raise UsageError(f"lowbit: the saliency of block {self.block_index} is zero everywhere")
        self.reference = reference.item()

    def wrap(self, layer, spec):
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, spec.name, "lora"))
        return AdaptedLinear(layer, spec, self.config.lora_rank, self.config.lora_alpha, generator,
                             clip_init=self.config.clip_init, compensated=self.compensates())

    # --- training ----------------------------------------------------------------------

    def regularizer(self) -> torch.Tensor:
        """R of this block (see the module docstring)."""
        total = sum(w.weighted_error(self.config.reg_variant) for w in self.wrappers.values())
        return total / self.reference

    def stage_epochs(self) -> dict[str, int]:
        epochs = {name: self.config.stage_epochs.get(name, 0) for name in STAGES}
        if not self.config.saliency and (epochs["wpt"] or epochs["mixedt"]):
            raise UsageError("lowbit: the apiq stages wpt and mixedt need saliency (saliency=True or a directory)")
        return epochs

    def stages(self) -> list[Stage]:
        lam = self.config.reg_lambda * self.config.reg_growth**self.block_index
        reg = {"wpt": lam, "mixedt": lam, "opt": 0.0}
        output = {"wpt": False, "mixedt": True, "opt": True}
        return [
            Stage(name, self._groups(name), epochs=epochs, options={"reg": reg[name]}, needs_output=output[name])
            for name, epochs in self.stage_epochs().items()
            if epochs
        ]

    def _groups(self, stage: str) -> list[dict]:
        params = {
            "lora": [p for w in self.wrappers.values() for p in w.lora_parameters()],
            "clip": [p for w in self.wrappers.values() for p in w.clip_parameters()],
        }
        lr, wd = self.config.lr, self.config.weight_decay
        return [
            {"params": ps, "lr": lr.get(f"{stage}.{g}", lr[g]), "weight_decay": wd.get(f"{stage}.{g}", wd[g])}
            for g, ps in params.items()
        ]

    def loss(self, pred, targets, stage):
        total, terms = 0.0, {}
        if stage.needs_output:
            total, terms = super().loss(pred, targets, stage)
        if stage.options.get("reg", 0.0):
            r = self.regularizer()
            total = total + stage.options["reg"] * r
            terms["reg"] = r.detach()
        return total, terms

    def export(self, local_name, wrapper):
        return wrapper.to_quant_linear()
