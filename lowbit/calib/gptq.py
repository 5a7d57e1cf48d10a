"""Hessian-based error compensation (GPTQ, Frantar et al. 2022) on a block's stand-ins.

For a linear layer with inputs X (rows: tokens of every calibration window on the
quantized stream), H = 2 X^T X / n. Quantizing column j of W to q_j leaves the error
e_j = (w_j - q_j) / [H^-1]_jj; GPTQ moves it onto the columns not yet quantized,
W[:, j+1:] -= e_j [H^-1]_{j, j+1:}, which minimises the output error ||X W^T - X Q^T||
column by column. With the Cholesky factor U of H^-1 (upper), [H^-1]_{j, j:} of the
remaining columns is U_{j, j:}, so one factorisation serves every column; updates are
applied lazily, `block_size` columns at a time.

Act-order quantizes the columns by decreasing diag(H) (the most important first, while
the most columns remain to absorb their error). The grid is static: the scales and
zeros of every group are fixed before the first column, from the original weight, so
that they still describe contiguous groups and the checkpoint needs no permutation.

The layers of a block are compensated in true-sequential order: the layers that read
the same input (q/k/v, then o, then gate/up, then down in a Llama block) form one
step, whose Hessians are taken on a pass of the block in which every earlier step is
already quantized. The steps are found from the order in which the stand-ins are
called, so no model type is named here.

The stand-ins are `ClippedLinear`s (lowbit.calib.methods.lwc): their clip logits set the
grid (optionally searched per group here), and the compensated weight W~ (each column
as it stood when it was quantized) becomes the weight they round, so that the stand-in,
its export and any training that follows start from GPTQ's codes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.calib import distributed
from lowbit.errors import CalibrationError

DAMP_MAX = 1.0        # the most dampening tried (x10 per retry) while H is not positive definite
CLIP_RATIOS = 16      # shrink factors tried by the grid search, from 1 down to CLIP_MIN_RATIO
CLIP_MIN_RATIO = 0.55


@dataclass(frozen=True)
class GPTQOptions:
    """damp: added to diag(H), relative to its mean; block_size: columns per lazy update;
    act_order: columns by decreasing diag(H); clip_search: choose each group's range
    shrink by the diag(H)-weighted rounding error before compensating."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    clip_search: bool = True


class HessianCollector:
    """Records the order in which some stand-ins are called and which of them share an
    input (the steps), and accumulates X^T X of the first step's input over forward
    passes: the later steps' inputs change once the first is quantized."""

    def __init__(self, modules: dict[str, nn.Module], block_name: str):
        self.modules, self.block_name = modules, block_name
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.steps: list[list[str]] = []  # of the first batch
        self._first_batch: set[str] = set()
        self._last_input: torch.Tensor | None = None
        self._handles = []

    def __enter__(self) -> HessianCollector:
        for local, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(local)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._last_input = None

    def _hook(self, local: str) -> Callable:
        def hook(module, args):
            self._record_order(local, args[0])
            if local not in self.steps[0]:
                return  # a later step: its inputs change once this step is quantized
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1]).float()
            if not torch.isfinite(rows).all():
                raise CalibrationError(
                    f"lowbit: the inputs of {self.block_name}.{local} contain NaN or Inf; "
                    "calibration stopped at this layer"
                )
            owner = self.steps[0][0]  # the layers of a step share one input: one sum
            if owner not in self.sums:
                self.sums[owner] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
                self.rows[owner] = 0
            if local == owner:
                self.sums[owner].addmm_(rows.T, rows)
                self.rows[owner] += rows.shape[0]

        return hook

    def _record_order(self, local: str, x: torch.Tensor) -> None:
        if local in self._first_batch:
            return
        self._first_batch.add(local)
        if self.steps and x is self._last_input:
            self.steps[-1].append(local)
        else:
            self.steps.append([local])
        self._last_input = x  # held, so that its address is not reused by another input

    def hessian(self, local: str) -> torch.Tensor:
        """2 X^T X / n over every calibration window (of every process, when distributed)."""
        if local not in self.steps[0]:
            raise ValueError(f"{local} is not in the first step {self.steps[0]}: its inputs were not summed")
        owner = self.steps[0][0]
        rows = torch.tensor([float(self.rows[owner])], device=self.sums[owner].device)
        total = distributed.sum_tensor(torch.cat([self.sums[owner].reshape(-1), rows]), "summing Hessians")
        return total[:-1].view_as(self.sums[owner]) * (2.0 / total[-1].item())


def inverse_cholesky(hessian: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; the dampening grows
    x10 (with a warning) while H is not numerically positive definite."""
    mean_diag = hessian.diagonal().mean().item()
    eye = torch.eye(hessian.shape[0], device=hessian.device)
    level = damp
    while True:
        factor, info = torch.linalg.cholesky_ex(hessian + level * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if info == 0:
                if level != damp:
                    warnings.warn(f"lowbit: {name}: the Hessian needed dampening {level:g} "
                                  f"(asked {damp:g}) to be positive definite", stacklevel=3)
                return upper
        if level >= DAMP_MAX:
            raise CalibrationError(
                f"lowbit: {name}: the Hessian of its inputs is singular even with dampening {level:g}; "
                "use more calibration windows or a larger damp"
            )
        level *= 10


def compensate(
    weight: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
    options: GPTQOptions, name: str,
) -> torch.Tensor:
    """GPTQ on weight [N, K] with the static grid scales/zeros [N, G] (float32, the
    stored values); returns W~ [N, K] float32: each column as it stood when it was
    rounded, so that clamp(round(W~ / s) + z, 0, 2^bits - 1) are GPTQ's codes."""
    w = weight.detach().float().clone()
    h = hessian.clone()
    k = w.shape[1]
    group_size = k // scales.shape[1]
    dead = h.diagonal() == 0  # inputs that are always zero: nothing to compensate
    h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True) if options.act_order else torch.arange(k, device=w.device)
    w, h = w[:, order], h[order][:, order]
    u = inverse_cholesky(h, options.damp, name)
    group = order // group_size
    s, z = scales.float()[:, group], zeros.float()[:, group]  # per (permuted) column
    maxq = 2**bits - 1
    compensated = torch.empty_like(w)
    for start in range(0, k, options.block_size):
        end = min(start + options.block_size, k)
        chunk = w[:, start:end].clone()
        errors = torch.empty_like(chunk)
        u_chunk = u[start:end, start:end]
        for i in range(end - start):
            col = chunk[:, i]
            compensated[:, start + i] = col
            j = start + i
            q = torch.clamp(torch.round(col / s[:, j]) + z[:, j], 0, maxq)
            error = (col - s[:, j] * (q - z[:, j])) / u_chunk[i, i]
            chunk[:, i:].addr_(error, u_chunk[i, i:], alpha=-1.0)
            errors[:, i] = error
        w[:, end:].addmm_(errors, u[start:end, end:], alpha=-1.0)
    result = torch.empty_like(compensated)
    result[:, order] = compensated
    return result


@torch.no_grad()
def search_clip(wrapper: nn.Module, importance: torch.Tensor) -> None:
    """Sets each group's clip logits of a ClippedLinear to the range shrink (one ratio
    for both ends, from 1 down to CLIP_MIN_RATIO) with the least rounding error weighted
    by `importance` [in_features] (diag H)."""
    w = wrapper.grouped_weight()
    weights = importance.float().reshape(1, w.shape[1], w.shape[2])
    best_error = torch.full(wrapper.upper.shape, math.inf, device=w.device)
    best_logit = torch.zeros_like(best_error)
    for ratio in torch.linspace(1.0, CLIP_MIN_RATIO, CLIP_RATIOS).tolist():
        logit = 100.0 if ratio == 1.0 else math.log(ratio / (1.0 - ratio))  # sigmoid(100) = 1 in float32
        wrapper.upper.fill_(logit)
        wrapper.lower.fill_(logit)
        error = (weights * (wrapper.fake_weight().view_as(w) - w).square()).sum(-1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_logit = torch.where(better, torch.full_like(best_logit, logit), best_logit)
    wrapper.upper.copy_(best_logit)
    wrapper.lower.copy_(best_logit)


@torch.no_grad()
def compensate_block(
    wrappers: dict[str, nn.Module], run_block: Callable[[], object], options: GPTQOptions, block_name: str
) -> None:
    """GPTQ for every stand-in of a block, in true-sequential steps. `run_block()` runs
    the block (its stand-ins installed) over every calibration window."""
    with HessianCollector(wrappers, block_name) as collector:
        run_block()
    steps = collector.steps
    never_called = sorted(set(wrappers) - {local for step in steps for local in step})
    if never_called:
        raise CalibrationError(f"lowbit: {block_name}.{never_called[0]} was never called on the calibration data")
    for n, step in enumerate(steps):
        if n:  # the inputs of this step, with every earlier step quantized
            with HessianCollector({local: wrappers[local] for local in step}, block_name) as collector:
                run_block()
        for local in step:
            _compensate_layer(wrappers[local], collector.hessian(local), options, f"{block_name}.{local}")


def _compensate_layer(wrapper: nn.Module, hessian: torch.Tensor, options: GPTQOptions, name: str) -> None:
    if options.clip_search:
        search_clip(wrapper, hessian.diagonal())
    scales, zeros = wrapper.scales_zeros()
    compensated = compensate(wrapper.original_weight(), hessian, scales.squeeze(-1), zeros.squeeze(-1),
                             wrapper.bits, options, name)
    wrapper.set_compensated(compensated)
