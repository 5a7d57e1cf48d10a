"""OmniQuant with learnable weight clipping (LWC), weight-only.

Each decoder block is trained on its own: the clip logits of every linear layer
(`lowbit.methods.lwc.ClippedLinear`) minimise the reconstruction loss between the
block with fake-quantized weights on the quantized stream and the full-precision
block on the full-precision stream (plus, with aug_loss, the full-precision block
on the quantized stream). The learnable equivalent transformation (LET) of the
paper is not implemented; the published weight-only LLaMA recipes use LWC alone.

Defaults (the published recipe, OmniQuant's code): 128 windows x 2048 tokens,
20 epochs (40 at 2 bits), batch 1, AdamW with lr {"clip": 1e-2} and no weight
decay, aug_loss at 2 bits. Settings: clip_init (4.0, the initial clip logits), init
("rtn"; "gptq": start from GPTQ, lowbit.calib.methods.gptq).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.calib.methods.base import LayerSpec, Method, Stage
from lowbit.calib.methods.gptq import StartsFromGPTQ, check_init
from lowbit.calib.methods.lwc import ClippedLinear, check_clip_init


@dataclass
class OmniQuantSettings:
    """clip_init: the initial clip logits (sigmoid(4) = 0.982 of the range); init: "rtn"
    (train from round-to-nearest) or "gptq" (from GPTQ's codes and searched ranges)."""

    clip_init: float | None = None
    init: str | None = None

    def __post_init__(self):
        check_clip_init(self.clip_init)
        check_init(self.init)


class OmniQuant(StartsFromGPTQ, Method):
    name = "omniquant"
    Settings = OmniQuantSettings

    @classmethod
    def defaults(cls, config):
        return {
            "nsamples": 128,
            "seqlen": 2048,
            "epochs": 40 if config.bits == 2 else 20,
            "aug_loss": config.bits == 2,
            "lr": {"clip": 1e-2},
            "weight_decay": {"clip": 0.0},
            "clip_init": 4.0,
            "init": "rtn",
        }

    def wrap(self, layer: nn.Module, spec: LayerSpec) -> nn.Module:
        return ClippedLinear(layer, spec.bits, spec.group_size, spec.scale_dtype, init=self.config.clip_init,
                             compensated=self.compensates())

    def stages(self) -> list[Stage]:
        params = [p for w in self.wrappers.values() for p in w.clip_parameters()]
        group = {"params": params, "lr": self.config.lr["clip"], "weight_decay": self.config.weight_decay["clip"]}
        return [Stage("lwc", [group], epochs=self.config.epochs)]

    def export(self, local_name: str, wrapper: nn.Module) -> nn.Module:
        return wrapper.to_quant_linear()
