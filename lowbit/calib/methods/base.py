"""The interface between the calibration engine and a method.

The engine (`lowbit.calib.engine`) owns the data flow, the optimisation loop, devices,
checkpoints and logging. A method says, for one decoder block at a time:

- how each linear layer is replaced during calibration (`wrap`: a trainable
  stand-in that computes with fake-quantized weights);
- what is trained, in which stages, with which optimiser groups (`stages`);
- the loss (`loss`; by default `(1 - w) * MSE + w * SW` against each target);
- what each layer becomes afterwards (`export`: normally a `QuantLinear`);
- optionally, what it sets from its layers' inputs before training (`fit`).

and, for the run as a whole, its settings and budgets:

- `Settings`: a dataclass of the method's own settings (`QuantConfig.options`),
  checked when a config names the method; None accepts any options unchecked;
- `defaults`: the published recipe (budget, learning rates, own settings);
- `quick`: what the command line's quick budget changes for a CPU run.

A new method subclasses `Method`, sets `name`, and registers itself with
`lowbit.calib.methods.register`; neither the engine nor the config nor the
command line needs a change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.calib.losses import reconstruction_loss
from lowbit.calib.seeds import derive_seed
from lowbit.errors import CheckpointError

ORIGINAL = "linear"  # wrappers keep the original layer under this attribute name

# The quick budget: what calibrates the default model (SmolLM2-135M) on a 2-core CPU in
# about a minute and a half. Methods training clipping logits (which start at 4, 98.2 %
# of the range) need a larger learning rate than the published 1e-2 to move them in so
# few steps (docs/CALIBRATION.md).
QUICK_BUDGET = {"nsamples": 8, "seqlen": 512, "epochs": 2}
QUICK_CLIP_LR = 0.1


@dataclass
class LayerSpec:
    """One linear layer to quantize: its name in the model and its grid."""

    name: str
    bits: int
    group_size: int  # resolved: in_features for per-channel
    scale_dtype: torch.dtype


@dataclass
class Stage:
    """One phase of a block's training: its optimiser groups and length.

    `param_groups` are torch optimiser groups (`{"params": [...], "lr": ...,
    "weight_decay": ...}`); a fresh `optimizer` is built over them when the stage
    starts. Length: `epochs` passes over the calibration windows, or exactly
    `steps` optimiser steps when `steps` is set. `options` is free for the method
    (e.g. loss weights that differ between stages). `needs_output=False` marks a stage
    whose loss depends on the weights alone: the engine then skips the block's forward
    pass and gives `loss` pred=None.
    """

    name: str
    param_groups: list[dict[str, Any]]
    epochs: int = 0
    steps: int | None = None
    optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] = torch.optim.AdamW
    options: dict[str, Any] = field(default_factory=dict)
    needs_output: bool = True


class Method:
    """Base class of calibration methods; one instance per decoder block.

    Attributes the engine sets up: `config` (the resolved QuantConfig),
    `block_index`, `num_blocks`, `wrappers` (local layer name -> stand-in, after
    `setup`) and `specs` (local layer name -> LayerSpec).
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True  # False: no calibration data, no training
    Settings: ClassVar[type | None] = None  # dataclass of the method's own settings

    @classmethod
    def defaults(cls, config) -> dict[str, Any]:
        """The published recipe for `config`: nsamples, seqlen, epochs, aug_loss, lr and
        weight_decay, and a value for each of the method's own settings."""
        raise NotImplementedError

    @classmethod
    def quick(cls, config) -> dict[str, Any]:
        """What the quick budget sets for `config` (QuantConfig fields and own settings,
        `lr` by group): a CPU-sized run. Without data, nothing."""
        if not cls.needs_data:
            return {}
        lr = {"clip": QUICK_CLIP_LR} if "clip" in cls.defaults(config).get("lr", {}) else {}
        return {**QUICK_BUDGET, "lr": lr}

    @classmethod
    @contextlib.contextmanager
    def prepare(cls, model: nn.Module, tokens: torch.Tensor, config) -> Iterator[Any]:
        """Run-level setup: entered once before the first block, with the full-precision
        model and the calibration tokens [nsamples, seqlen]; yields the config that the
        blocks run with (e.g. naming data computed here) and cleans up when the run ends."""
        yield config

    def __init__(self, config, block_index: int, num_blocks: int):
        self.config = config
        self.block_index = block_index
        self.num_blocks = num_blocks
        self.wrappers: dict[str, nn.Module] = {}
        self.specs: dict[str, LayerSpec] = {}
        # Draws the SW projections; seeded per block so that a resumed run matches.
        self.loss_generator = torch.Generator().manual_seed(derive_seed(config.seed, block_index, "loss"))

    def setup(self, layers: dict[str, tuple[nn.Module, LayerSpec]]) -> dict[str, nn.Module]:
        """Wraps every layer to quantize (local name -> (layer, spec)); returns the stand-ins."""
        self.specs = {local: spec for local, (_, spec) in layers.items()}
        self.wrappers = {}
        for local, (layer, spec) in layers.items():
            try:
                self.wrappers[local] = self.wrap(layer, spec)
            except ValueError as exc:
                raise type(exc)(f"{spec.name}: {exc}") from exc
        return self.wrappers

    # --- to implement ------------------------------------------------------------------

    def wrap(self, layer: nn.Module, spec: LayerSpec) -> nn.Module:
        """The stand-in used during calibration. It must keep `layer` as its attribute
        `linear`; everything else in its state_dict is the learned state (checkpointed)."""
        raise NotImplementedError

    def export(self, local_name: str, wrapper: nn.Module) -> nn.Module:
        """The final module replacing the layer (normally a QuantLinear)."""
        raise NotImplementedError

    def stages(self) -> list[Stage]:
        """The training stages of this block (none: nothing is trained)."""
        return []

    # --- optional hooks ----------------------------------------------------------------

    def fit(self, run_block: Callable[[], object]) -> None:
        """Called once before training, with the stand-ins installed: `run_block()` runs the
        block over every calibration window of the quantized stream, without gradients (so
        that a method can see its layers' inputs, as GPTQ does)."""

    def begin_stage(self, stage: Stage) -> None:
        """Called before a stage's first step (e.g. to harden part of the rounding)."""

    def after_step(self, stage: Stage) -> None:
        """Called after every optimiser step (e.g. to project parameters)."""

    def loss(
        self, pred: torch.Tensor, targets: list[torch.Tensor], stage: Stage
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one batch and its terms for the log. `targets[0]` is the
        full-precision block on the full-precision inputs; `targets[1]`, with
        aug_loss, the full-precision block on the quantized inputs. Each target adds
        `(1 - w) * MSE + w * SW` (w = config.sw_weight)."""
        total, terms = 0.0, {}
        for k, target in enumerate(targets):
            part, part_terms = reconstruction_loss(
                pred, target, self.config.sw_weight, self.config.sw_projections, self.loss_generator
            )
            total = total + part
            suffix = "" if k == 0 else "_aug"
            terms.update({name + suffix: value for name, value in part_terms.items()})
        return total, terms

    # --- checkpoints -------------------------------------------------------------------

    def learned_state(self) -> dict[str, torch.Tensor]:
        """Everything the wrappers learned, keyed '<local name>.<tensor>'."""
        state = {}
        for local, wrapper in self.wrappers.items():
            for key, value in wrapper.state_dict().items():
                if not key.startswith(ORIGINAL + "."):
                    state[f"{local}.{key}"] = value.detach().cpu().contiguous()
        return state

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.learned_state())
        if set(state) != expected:
            raise CheckpointError(
                f"lowbit: checkpoint holds {sorted(set(state) ^ expected)[:4]}... that do not "
                f"match the {self.name} stand-ins of this block"
            )
        for local, wrapper in self.wrappers.items():
            own = {k[len(local) + 1:]: v for k, v in state.items() if k.startswith(local + ".")}
            wrapper.load_state_dict(own, strict=False)
