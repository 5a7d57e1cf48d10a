"""TesseraQ: progressive adaptive rounding (PAR) with dequantization scale tuning (DST).

Per group, the scale s and integer zero z are fixed first: by learnable clipping
trained for `stage_epochs["lwc"]` epochs (rounding_init="omniquant", the init of
TesseraQ's per-channel W2 recipe) or by min-max ("minmax"). Then every weight gets
a rounding variable alpha and every group a scale logit v:

    h(alpha) = clamp(1.2 sigmoid(alpha) - 0.1, 0, 1)          rectified sigmoid
    W^       = 2 sigmoid(v) s (clamp(floor(W / s) + h(alpha) + z, 0, 2^b - 1) - z)

with alpha initialised so that h = frac(W / s) (training starts at W itself, inside
the clipping range) and v = 0. Each PAR stage k first hardens, in every layer, all
weights but the fraction t_k whose h is closest to 0.5 (alpha <- +-100, h exactly 1
or 0, no gradient), then trains the soft alphas and v with a fresh Adam for
`rounding_steps` steps on the block loss. After the last stage every weight is
hardened by the sign of alpha. The exported codes are the integers
clamp(floor(W / s) + [alpha > 0] + z, 0, 2^b - 1) and the stored scale is
2 sigmoid(v) s (the DST factor folded in), so the QuantLinear computes exactly the
trained block.

Loss: the engine's block loss, (1 - w) MSE + w SW against the full-precision
target. TesseraQ's own L2 (summed over the hidden size, mean over tokens) is D
times this MSE: the same minimiser and, under Adam, nearly the same steps; using
the engine's MSE keeps `sw_weight` meaning the same as under omniquant and apiq
(with TesseraQ's L2 the same w gives SW about D times less weight). Both terms are
logged per epoch.

Defaults (TesseraQ's LLaMA-2 configs, where they fit the engine): 512 windows x
2048 tokens, 20 stages with thresholds 0.8 ... 0.005 of 250 steps each, batch 1
(TesseraQ: 4), Adam lr 1e-3 for alpha and v with weight decay 1e-4 on v, no
aug_loss; with rounding_init="omniquant", stage_epochs {"lwc": 2} of clipping
at lr 1e-2 first (TesseraQ loads clips from a full OmniQuant run instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.calib.methods.apiq import check_stage_epochs
from lowbit.calib.methods.base import LayerSpec, Method, Stage
from lowbit.calib.methods.gptq import StartsFromGPTQ, check_init
from lowbit.calib.methods.lwc import ClippedLinear, cast_ste, check_clip_init
from lowbit.errors import UsageError
from lowbit.nn import QuantLinear

THRESHOLDS = (0.8, 0.65, 0.5, 0.43, 0.38, 0.34, 0.3, 0.27, 0.24, 0.21,
              0.18, 0.15, 0.12, 0.10, 0.08, 0.06, 0.04, 0.02, 0.01, 0.005)
HARD = 100.0  # |alpha| of a hardened weight: h is exactly 0 or 1 and its gradient zero
ROUNDING_INITS = ("omniquant", "minmax")


@dataclass
class TesseraQSettings:
    """tesseraq's own settings (None: the default of `TesseraQ.defaults`).

    rounding_thresholds  the fraction of weights left soft after each hardening stage,
                         decreasing in (0, 1).
    rounding_steps       optimiser steps per hardening stage (250).
    rounding_init        "omniquant" (learn the clipping first, stage "lwc") or "minmax".
    stage_epochs         {"lwc": epochs} of the clipping init (2).
    clip_init            the initial clip logits (4.0).
    init                 "rtn" or "gptq": the rounding (and clipping) start from GPTQ's
                         compensated weights and searched ranges.
    """

    rounding_thresholds: tuple[float, ...] | None = None
    rounding_steps: int | None = None
    rounding_init: str | None = None
    stage_epochs: dict[str, int] | None = None
    clip_init: float | None = None
    init: str | None = None

    def __post_init__(self):
        check_init(self.init)
        t = self.rounding_thresholds
        if t is not None:
            t = tuple(float(x) for x in t)
            if not all(0.0 < x < 1.0 for x in t) or any(a <= b for a, b in zip(t, t[1:])):
                raise UsageError(f"lowbit: rounding_thresholds must decrease within (0, 1), got {list(t)}")
        steps = self.rounding_steps
        if steps is not None and (not isinstance(steps, int) or steps < 0):
            raise UsageError(f"lowbit: rounding_steps must be an integer >= 0, got {steps!r}")
        if self.rounding_init not in (None, *ROUNDING_INITS):
            raise UsageError(f"lowbit: rounding_init must be one of {ROUNDING_INITS}, got {self.rounding_init!r}")
        check_stage_epochs(self.stage_epochs, ("lwc",), "tesseraq")
        check_clip_init(self.clip_init)


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return (1.2 * torch.sigmoid(alpha) - 0.1).clamp(0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """alpha with rectified_sigmoid(alpha) = h, for h in [0, 1)."""
    return torch.logit((h + 0.1) / 1.2)


class RoundingLinear(ClippedLinear):
    """Stand-in of tesseraq: a ClippedLinear until `start_rounding`, then the soft
    rounding quantizer of the module docstring on the frozen grid."""

    def __init__(self, linear: nn.Module, spec: LayerSpec, clip_init: float = 4.0, train_clip: bool = True,
                 compensated: bool = False):
        super().__init__(linear, spec.bits, spec.group_size, spec.scale_dtype, init=clip_init,
                         compensated=compensated)
        if not train_clip:  # min-max: sigmoid(100) = 1 in float32, the range is the whole group
            with torch.no_grad():
                self.upper.fill_(100.0)
                self.lower.fill_(100.0)
        grid = self.upper.shape
        device = self.upper.device
        # Placeholders until `start_rounding`, so that the learned state has fixed keys.
        self.alpha = nn.Parameter(torch.zeros(self.grouped_weight().shape, device=device))
        self.scale_logit = nn.Parameter(torch.zeros(grid, device=device))
        self.register_buffer("rounding", torch.tensor(False, device=device))
        self.register_buffer("grid_scales", torch.ones(grid, device=device))
        self.register_buffer("grid_zeros", torch.zeros(grid, device=device))

    @torch.no_grad()
    def start_rounding(self) -> None:
        """Freezes s and z at the current clipping; h starts at frac(W / s)."""
        s, z = self.scales_zeros()
        self.grid_scales.copy_(s)
        self.grid_zeros.copy_(z)
        x = self.grouped_weight() / s
        self.alpha.copy_(inverse_rectified_sigmoid(x - torch.floor(x)))
        self.scale_logit.zero_()
        self.rounding.fill_(True)

    @torch.no_grad()
    def harden(self, soft_fraction: float) -> None:
        """Hardens all weights but the `soft_fraction` whose h is closest to 0.5."""
        score = (rectified_sigmoid(self.alpha) - 0.5).abs().flatten()
        keep = int(round(soft_fraction * score.numel()))
        if keep <= 0:
            self.alpha.copy_(HARD * torch.where(self.alpha > 0, 1.0, -1.0))
            return
        cutoff = score.kthvalue(keep).values
        hard = (score > cutoff).view_as(self.alpha)
        self.alpha.copy_(torch.where(hard, HARD * torch.where(self.alpha > 0, 1.0, -1.0), self.alpha))

    def soft_fraction(self) -> float:
        return ((self.alpha.detach().abs() < HARD).float().mean()).item()

    def output_scales(self) -> torch.Tensor:
        """2 sigmoid(v) s, rounded to the storage dtype (straight through)."""
        return cast_ste(2.0 * torch.sigmoid(self.scale_logit) * self.grid_scales, self.scale_dtype)

    def fake_weight(self) -> torch.Tensor:
        if not self.rounding:
            return super().fake_weight()
        w = self.grouped_weight()
        q = (torch.floor(w / self.grid_scales) + rectified_sigmoid(self.alpha) + self.grid_zeros).clamp(0, self.maxq)
        return (self.output_scales() * (q - self.grid_zeros)).reshape(w.shape[0], -1)

    @torch.no_grad()
    def finish_rounding(self) -> None:
        """Hardens every weight still soft (in place, so the stand-in computes the
        exported weights too). Without any PAR stage: round to nearest on the grid."""
        if not self.rounding:
            self.start_rounding()
        self.harden(0.0)

    @torch.no_grad()
    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hard codes, DST-folded scales and zeros (after `finish_rounding`): exactly the
        weights of `fake_weight`."""
        self.finish_rounding()
        w = self.grouped_weight()
        up = (self.alpha > 0).float()
        codes = (torch.floor(w / self.grid_scales) + up + self.grid_zeros).clamp(0, self.maxq)
        codes = codes.reshape(w.shape[0], -1).to(torch.uint8)
        scales = self.output_scales().squeeze(-1).to(self.scale_dtype)
        zeros = self.grid_zeros.squeeze(-1).to(self.scale_dtype)
        return codes, scales, zeros

    def to_quant_linear(self) -> QuantLinear:
        codes, scales, zeros = self.quantized()
        bias = self.linear.bias
        return QuantLinear.from_quantized(codes, scales, zeros, None if bias is None else bias.detach(),
                                          bits=self.bits, group_size=self.group_size)

    def rounding_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def scale_parameters(self) -> list[nn.Parameter]:
        return [self.scale_logit]


class TesseraQ(StartsFromGPTQ, Method):
    name = "tesseraq"
    Settings = TesseraQSettings

    @classmethod
    def defaults(cls, config):
        return {
            "nsamples": 512,
            "seqlen": 2048,
            "epochs": 0,  # the PAR stages count steps; epochs apply to nothing else
            "aug_loss": False,
            "lr": {"clip": 1e-2, "rounding": 1e-3, "scale": 1e-3},
            "weight_decay": {"clip": 0.0, "rounding": 0.0, "scale": 1e-4},
            "rounding_thresholds": THRESHOLDS,
            "rounding_steps": 250,
            "rounding_init": "omniquant",
            "stage_epochs": {"lwc": 2},
            "clip_init": 4.0,
            "init": "rtn",
        }

    @classmethod
    def quick(cls, config):
        """The published recipe is 20 thresholds x 250 steps per block (hours on a CPU):
        one clipping epoch, then 4 rounding stages of 3 steps at a larger learning rate."""
        budget = super().quick(config)
        budget["lr"].update({"rounding": 5e-3, "scale": 5e-3})
        return {**budget, "stage_epochs": {"lwc": 1}, "rounding_thresholds": (0.5, 0.25, 0.1, 0.03),
                "rounding_steps": 3}

    def wrap(self, layer, spec):
        return RoundingLinear(layer, spec, clip_init=self.config.clip_init,
                              train_clip=self.config.rounding_init == "omniquant", compensated=self.compensates())

    def stages(self) -> list[Stage]:
        lr, wd = self.config.lr, self.config.weight_decay
        wrappers = list(self.wrappers.values())
        stages = []
        if self.config.rounding_init == "omniquant":
            clip = [p for w in wrappers for p in w.clip_parameters()]
            stages.append(Stage("lwc", [{"params": clip, "lr": lr["clip"], "weight_decay": wd["clip"]}],
                                epochs=self.config.stage_epochs.get("lwc", 0)))
        for k, threshold in enumerate(self.config.rounding_thresholds):
            groups = [  # fresh dicts: an optimizer keeps its own
                {"params": [p for w in wrappers for p in w.rounding_parameters()],
                 "lr": lr["rounding"], "weight_decay": wd["rounding"]},
                {"params": [p for w in wrappers for p in w.scale_parameters()],
                 "lr": lr["scale"], "weight_decay": wd["scale"]},
            ]
            stages.append(Stage(f"par{k + 1}", groups, steps=self.config.rounding_steps,
                                optimizer=torch.optim.Adam, options={"threshold": threshold}))
        return stages

    def begin_stage(self, stage: Stage) -> None:
        if "threshold" not in stage.options:
            return
        for w in self.wrappers.values():
            if not w.rounding:
                w.start_rounding()
            w.harden(stage.options["threshold"])

    def export(self, local_name, wrapper):
        return wrapper.to_quant_linear()
