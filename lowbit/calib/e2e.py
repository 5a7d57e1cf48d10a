"""The end-to-end stage: after the block-wise pass, the scales of every quantized layer
(and its adapter, where calibration attached one) are trained together with the codes
frozen, on the calibration windows, against the full-precision model's next-token
distribution (EfficientQAT's E2E-QP, with the KL divergence of the logits as its loss).

Each scale is trained as a factor on its stored value, s = s0 * f with f starting at 1
(Adam's steps are then relative changes of the scale), and rounded to the storage
dtype in the forward pass (straight through), so the tuned model computes exactly what
its export computes. Zeros stay the integers of the block-wise pass, which keeps every
checkpoint exportable to GPTQ's format.

The teacher is the full-precision model's last hidden states (the engine's full-
precision stream after the last block) through the model's final norm and head, kept
in full precision; the student is the whole quantized model. Memory: the model with
float32 dequantized weights for the backward pass, plus one batch of logits.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.calib.blocks import batches
from lowbit.calib.methods.lwc import cast_ste
from lowbit.calib.resume import CheckpointStore
from lowbit.calib.seeds import derive_seed
from lowbit.errors import CalibrationError, UsageError
from lowbit.nn import QuantLinear
from lowbit.nn.modules import set_submodule

# Where the final norm lives (the blocks' paths: lowbit.calib.blocks.BLOCK_PATHS).
FINAL_NORM_PATHS = ("model.norm", "model.decoder.final_layer_norm", "transformer.ln_f",
                    "gpt_neox.final_layer_norm")


class ScaleTunedLinear(nn.Module):
    """A QuantLinear with trainable scale factors (and adapter), its codes frozen."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        self.bits, self.group_size, self.scale_dtype = layer.bits, layer.group_size, layer.scales.dtype
        self.register_buffer("codes", layer.codes())
        self.register_buffer("base_scales", layer.scales.float())
        self.register_buffer("zeros", layer.zeros.float())
        self.register_buffer("bias", layer.bias)
        self.factor = nn.Parameter(torch.ones_like(self.base_scales))
        self.adapter = copy.deepcopy(layer.adapter)
        if self.adapter is not None:  # trained in float32, stored back in its dtype
            self.adapter_dtype = self.adapter.A.dtype
            self.adapter.float().requires_grad_(True)

    def scales(self) -> torch.Tensor:
        return cast_ste(self.base_scales * self.factor, self.scale_dtype)

    def weight(self) -> torch.Tensor:
        zeros = self.zeros.repeat_interleave(self.group_size, dim=1)
        scales = self.scales().repeat_interleave(self.group_size, dim=1)
        return (self.codes.float() - zeros) * scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.weight().to(x.dtype), bias)
        return y if self.adapter is None else y + self.adapter(x).to(y.dtype)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"scale": [self.factor], "lora": [] if self.adapter is None else list(self.adapter.parameters())}

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        layer = QuantLinear.from_quantized(self.codes, self.scales().to(self.scale_dtype),
                                           self.zeros.to(self.scale_dtype), self.bias,
                                           bits=self.bits, group_size=self.group_size)
        if self.adapter is not None:
            rank = self.adapter.rank
            layer.attach_adapter(rank, self.adapter.scale.item() * rank, A=self.adapter.A, B=self.adapter.B,
                                 dtype=self.adapter_dtype)
        return layer


def teacher_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """last hidden states -> logits of the full-precision model, from copies of its final
    norm and output layer taken now (before anything outside the blocks is quantized)."""
    norm = None
    for path in FINAL_NORM_PATHS:
        try:
            norm = model.get_submodule(path)
            break
        except AttributeError:
            continue
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise UsageError(f"lowbit: the end-to-end stage cannot find the final norm and output layer of "
                         f"{type(model).__name__}")
    norm, head = copy.deepcopy(norm).requires_grad_(False), copy.deepcopy(head).requires_grad_(False)
    project_out = getattr(getattr(getattr(model, "model", None), "decoder", None), "project_out", None)
    project_out = None if project_out is None else copy.deepcopy(project_out).requires_grad_(False)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        h = norm(hidden)
        if project_out is not None:
            h = project_out(h)
        return head(h)

    return logits


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over the tokens."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="batchmean")


class EndToEnd:
    """One end-to-end stage over a quantized model (see the module docstring)."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, teacher_hidden: torch.Tensor,
                 teacher: Callable[[torch.Tensor], torch.Tensor], config, device: torch.device,
                 store: CheckpointStore | None):
        self.model, self.tokens, self.teacher_hidden, self.teacher = model, tokens, teacher_hidden, teacher
        self.config, self.device, self.store = config, device, store

    def run(self) -> list[dict[str, Any]]:
        """Trains for config.e2e_epochs; returns the mean KL of every epoch."""
        stand_ins = self._install()
        optimizer = torch.optim.AdamW(self._param_groups(stand_ins), weight_decay=0.0)
        log, first = [], 0
        if self.store is not None and self.store.has_e2e():
            first, log = self._resume(stand_ins, optimizer)
        home = next(self.model.buffers()).device
        self.model.to(self.device)
        try:
            for epoch in range(first, self.config.e2e_epochs):
                log.append({"stage": "e2e", "epoch": epoch + 1, "kl": self._epoch(epoch, optimizer)})
                if self.store is not None:
                    self.store.save_e2e(self._state(stand_ins, optimizer), log)
        finally:
            self.model.to(home)
            with torch.no_grad():
                for name, stand_in in stand_ins.items():
                    set_submodule(self.model, name, stand_in.to(home).to_quant_linear())
        return log

    def _install(self) -> dict[str, ScaleTunedLinear]:
        layers = {name: m for name, m in self.model.named_modules() if isinstance(m, QuantLinear)}
        if not layers:
            raise UsageError("lowbit: the end-to-end stage needs the exported QuantLinear layers (export=True)")
        stand_ins = {name: ScaleTunedLinear(layer) for name, layer in layers.items()}
        for name, stand_in in stand_ins.items():
            set_submodule(self.model, name, stand_in)
        return stand_ins

    def _param_groups(self, stand_ins: dict[str, ScaleTunedLinear]) -> list[dict[str, Any]]:
        groups: dict[str, list[nn.Parameter]] = {"scale": [], "lora": []}
        for stand_in in stand_ins.values():
            for group, params in stand_in.parameter_groups().items():
                groups[group] += params
        return [{"params": params, "lr": self.config.e2e_lr[group]} for group, params in groups.items() if params]

    def _epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> float:
        n = self.tokens.shape[0]
        order = torch.Generator().manual_seed(derive_seed(self.config.seed, epoch, "e2e batch order"))
        total, steps = 0.0, math.ceil(n / self.config.batch_size)
        bar = tqdm(total=steps, desc=f"end-to-end epoch {epoch + 1}/{self.config.e2e_epochs}", unit="step",
                   leave=False, disable=not self.config.progress)
        try:
            for _, idx in zip(range(steps), batches(n, self.config.batch_size, order)):
                with torch.no_grad():
                    target = self.teacher(self.teacher_hidden[idx].to(self.device))
                logits = self.model(input_ids=self.tokens[idx].to(self.device), use_cache=False).logits
                loss = kl_divergence(target, logits)
                if not torch.isfinite(loss):
                    raise CalibrationError(f"lowbit: the end-to-end loss became {loss.item()} in epoch {epoch + 1}; "
                                           "try a lower e2e_lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx) / n
                bar.update(1)
                bar.set_postfix(kl=f"{loss.item():.4g}")
        finally:
            bar.close()
        return total

    # --- checkpoints ---

    def _state(self, stand_ins: dict[str, ScaleTunedLinear], optimizer) -> dict[str, torch.Tensor]:
        """Every trained tensor and its AdamW moments, by name."""
        state = {}
        for key, p in self._parameters(stand_ins).items():
            moments = optimizer.state[p]
            state[key] = p.detach().cpu()
            state[f"{key}.exp_avg"] = moments["exp_avg"].detach().cpu()
            state[f"{key}.exp_avg_sq"] = moments["exp_avg_sq"].detach().cpu()
            state[f"{key}.step"] = moments["step"].detach().cpu().reshape(1)
        return state

    @staticmethod
    def _parameters(stand_ins: dict[str, ScaleTunedLinear]) -> dict[str, nn.Parameter]:
        return {f"{name}.{key}": p for name, s in stand_ins.items() for key, p in s.named_parameters()}

    def _resume(self, stand_ins: dict[str, ScaleTunedLinear], optimizer) -> tuple[int, list[dict[str, Any]]]:
        state, log = self.store.load_e2e()
        params = self._parameters(stand_ins)
        expected = {f"{key}{suffix}" for key in params for suffix in ("", ".exp_avg", ".exp_avg_sq", ".step")}
        if set(state) != expected or not 0 < len(log) <= self.config.e2e_epochs:
            raise self.store.corrupt(self.store.e2e_path, "it does not hold this model's end-to-end state")
        try:
            with torch.no_grad():
                for key, p in params.items():
                    p.copy_(state[key])
                    optimizer.state[p] = {"step": state[f"{key}.step"].reshape(()).clone(),
                                          "exp_avg": state[f"{key}.exp_avg"].to(p.device).clone(),
                                          "exp_avg_sq": state[f"{key}.exp_avg_sq"].to(p.device).clone()}
        except RuntimeError as exc:
            raise self.store.corrupt(self.store.e2e_path, exc) from exc
        return len(log), log
