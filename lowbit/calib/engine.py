"""Block-wise calibration: the engine behind `lowbit.quantize`.

Data flow (OmniQuant's): the inputs of the first decoder block are captured for
every calibration window; then, block by block,

    targets    Y_fp  = F_i(X_fp; W)           full-precision block, full-precision stream
               Y_aug = F_i(X_q;  W)           with aug_loss: the second target
    training   the method's stand-ins minimise loss(F_i(X_q; W^), targets)
    export     every stand-in becomes its final module (a QuantLinear)
    streams    X_fp <- Y_fp;  X_q <- F_i(X_q; exported block)

so each block learns on the outputs of the blocks already quantized. The
quantized stream is propagated through the *exported* weights (computed densely),
so the next block sees exactly what the final model will compute.

One block at a time is on the compute device; the streams stay on the CPU and
move there one batch at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calib import distributed
from lowbit.calib.blocks import BlockCall, batches, capture_block_inputs, decoder_blocks, run_block
from lowbit.calib.config import QuantConfig
from lowbit.calib.data import calibration_tokens
from lowbit.calib.e2e import EndToEnd, teacher_head
from lowbit.calib.losses import reconstruction_loss
from lowbit.calib.methods import LayerSpec, Method, get_method
from lowbit.calib.resume import CheckpointStore, settings_digest, tensor_digest
from lowbit.calib.seeds import derive_seed
from lowbit.calib.shards import ResidentWeights
from lowbit.errors import CalibrationError, UsageError
from lowbit.format import DTYPE_NAMES, resolve_group_size
from lowbit.nn import QuantLinear, dense_weights, linear_weight
from lowbit.nn.modules import incompatibility, linear_layers, set_submodule, warn_incompatible
from lowbit.quant.grid import default_scale_dtype


@dataclass
class BlockLog:
    """What calibration did to one decoder block.

    loss_before: the block at the method's starting point (its stand-ins before
    training); loss_after: the exported block. Both against the full-precision
    target on all calibration windows: `mse` (mean over elements) and `sw` (the
    sliced-Wasserstein distance, same projections before and after). `epochs`:
    the mean training loss terms of every epoch, per stage.
    """

    index: int
    name: str
    layers: list[str]
    loss_before: dict[str, float] = field(default_factory=dict)
    loss_after: dict[str, float] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory: int | None = None  # bytes on the CUDA device; None on the CPU
    resumed: bool = False


@dataclass
class CalibrationReport:
    """The result of `lowbit.quantize`: per-block logs and what was (not) quantized."""

    method: str
    config: dict[str, Any]
    blocks: list[BlockLog]
    quantized: list[str]
    skipped: dict[str, str]
    seconds: float
    end_to_end: list[dict[str, Any]] = field(default_factory=list)  # mean KL per epoch
    peak_rss: int | None = None  # bytes: the calibration's peak resident memory, when measured

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [
            f"{self.method}: quantized {len(self.quantized)} linear layers "
            f"(skipped {len(self.skipped)}) in {self.seconds:.1f} s"
        ]
        for b in self.blocks:
            if b.loss_before:
                lines.append(
                    f"  block {b.index:3d}  mse {b.loss_before['mse']:.4g} -> {b.loss_after['mse']:.4g}"
                    f"  sw {b.loss_before['sw']:.4g} -> {b.loss_after['sw']:.4g}  {b.seconds:.1f} s"
                    + ("  (resumed)" if b.resumed else "")
                )
        if self.end_to_end:
            lines.append("  end to end  KL " + " -> ".join(f"{e['kl']:.4g}" for e in self.end_to_end))
        return "\n".join(lines)


def quantize(
    model: nn.Module | str | os.PathLike,
    config: QuantConfig | None = None,
    calibration: list[str] | torch.Tensor | None = None,
    tokenizer=None,
    *,
    export: bool = True,
    output: str | os.PathLike | None = None,
) -> CalibrationReport:
    """Quantizes a Hugging Face causal LM in place, block by block; returns the report.

    `model` may also be a model directory with safetensors weights: it is then calibrated
    out of core, one decoder block in memory at a time, into the lowbit checkpoint `output`
    (`lowbit.calib.outofcore`). In a torch.distributed job every process calibrates on a
    share of the windows (`lowbit.calib.distributed`).

    `calibration` is a list of texts (tokenized with `tokenizer`; `config.nsamples`
    windows of `config.seqlen` tokens are drawn from them with `config.seed`) or a
    LongTensor [nsamples, seqlen] of token ids, which then sets nsamples and seqlen.
    Methods without data (rtn) ignore it.

    Every linear layer inside the decoder blocks that `config.scheme` does
    not keep in full precision is replaced by a `QuantLinear`; linear layers outside
    the blocks (lm_head, unless skipped) are quantized round-to-nearest. With
    `export=False` the calibration stand-ins stay in the model instead (the
    fake-quantized model, frozen). The resolved settings are recorded as
    `model.lowbit_config` (`QuantConfig.record`).
    """
    if isinstance(model, (str, os.PathLike)):
        from lowbit.calib.outofcore import quantize_directory

        return quantize_directory(model, output, config, calibration, tokenizer)
    if output is not None:
        raise UsageError("lowbit: output is for a model directory; save a model in memory with lowbit.save_quantized")
    return quantize_model(model, config, calibration, tokenizer, export=export)


def quantize_model(model: nn.Module, config: QuantConfig | None, calibration, tokenizer, *, export: bool = True,
                   weights: ResidentWeights | None = None) -> CalibrationReport:
    """`quantize` of a model whose weights `weights` loads block by block (default: in memory)."""
    weights = weights or ResidentWeights()
    started = time.perf_counter()
    config = config or QuantConfig()
    method_cls = get_method(config.method)
    config = config.resolved(method_cls.defaults(config))
    if config.e2e_epochs and not (export and method_cls.needs_data):
        raise UsageError("lowbit: the end-to-end stage (e2e_epochs) needs a method that calibrates on data "
                         f"(not {config.method}) and the exported layers (export=True)")
    if config.e2e_epochs and (distributed.is_distributed() or type(weights) is not ResidentWeights):
        raise UsageError("lowbit: the end-to-end stage (e2e_epochs) trains the whole model at once: it runs "
                         "in one process on a model in memory, not out of core or distributed")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise UsageError("lowbit: this model already holds QuantLinear layers; quantize a full-precision model")
    prefix, blocks = decoder_blocks(model)
    plan, outside, skipped = plan_layers(model, prefix, blocks, config)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    was_training = model.training
    model.eval()
    end_to_end: list[dict[str, Any]] = []
    try:
        if method_cls.needs_data:
            if calibration is None:
                raise UsageError(
                    f"lowbit: method {config.method!r} needs calibration data: a list of texts with a "
                    "tokenizer, or a LongTensor [nsamples, seqlen] of token ids"
                )
            tokens = calibration_tokens(model, calibration, tokenizer, config.nsamples, config.seqlen,
                                        config.seed)
            config = dataclasses.replace(config, nsamples=tokens.shape[0], seqlen=tokens.shape[1])
            with method_cls.prepare(model, tokens, config) as run_config:
                run = _Run(model, prefix, blocks, plan, run_config, method_cls, device, export, weights)
                logs = run.calibrate(tokens)
        else:
            logs = _convert_without_data(prefix, blocks, plan, config, method_cls, weights)
        weights.load_outside(model)
        teacher = teacher_head(model) if config.e2e_epochs else None  # before the head is quantized
        for name, spec in outside.items():
            set_submodule(model, name, QuantLinear.from_linear(
                model.get_submodule(name), spec.bits, spec.group_size, spec.scale_dtype))
        if config.e2e_epochs:
            end_to_end = EndToEnd(model, tokens, run.streams.fp, teacher, config, device, run.store).run()
    finally:
        model.train(was_training)
    model.lowbit_config = config.record()
    quantized = [spec.name for layers in plan for spec in layers.values()] + list(outside)
    return CalibrationReport(config.method, config.to_dict(), logs, quantized, skipped,
                             time.perf_counter() - started, end_to_end)


# --- planning ----------------------------------------------------------------------------


def plan_layers(
    model: nn.Module, prefix: str, blocks: nn.ModuleList, config: QuantConfig
) -> tuple[list[dict[str, LayerSpec]], dict[str, LayerSpec], dict[str, str]]:
    """Per block: local name -> LayerSpec of the layers to quantize; the layers outside
    the blocks to quantize; and the skipped layers with the reason."""
    skipped: dict[str, str] = {}
    incompatible: dict[str, str] = {}

    def spec_for(name: str, layer: nn.Module) -> LayerSpec | None:
        scheme = config.scheme(name)
        if scheme is None:
            skipped[name] = "kept in full precision by skip/overrides"
            return None
        reason = incompatibility(layer, scheme.group_size)
        if reason:
            skipped[name] = incompatible[name] = reason
            return None
        weight = linear_weight(layer)
        scale_dtype = (DTYPE_NAMES[config.scale_dtype] if config.scale_dtype
                       else default_scale_dtype(weight.dtype))
        group_size = resolve_group_size(scheme.group_size, weight.shape[1])
        return LayerSpec(name, scheme.bits, group_size, scale_dtype)

    plan = []
    for i, block in enumerate(blocks):
        layers = {}
        for local, layer in linear_layers(block).items():
            spec = spec_for(f"{prefix}.{i}.{local}", layer)
            if spec is not None:
                layers[local] = spec
        plan.append(layers)
    outside = {}
    for name, layer in linear_layers(model).items():
        if not name.startswith(prefix + "."):
            spec = spec_for(name, layer)
            if spec is not None:
                outside[name] = spec
    warn_incompatible(incompatible, stacklevel=4)  # lowbit.quantize's caller
    return plan, outside, skipped


def _install(block: nn.Module, modules: dict[str, nn.Module]) -> None:
    for local, module in modules.items():
        set_submodule(block, local, module)


def _convert_without_data(prefix, blocks, plan, config, method_cls, weights) -> list[BlockLog]:
    logs = []
    for i, block in enumerate(blocks):
        weights.load_block(i, block)
        method = method_cls(config, i, len(blocks))
        layers = {local: (block.get_submodule(local), spec) for local, spec in plan[i].items()}
        wrappers = method.setup(layers)
        _install(block, {local: method.export(local, w) for local, w in wrappers.items()})
        weights.release_block(i, block)
        logs.append(BlockLog(i, f"{prefix}.{i}", [s.name for s in plan[i].values()]))
    return logs


# --- the block-wise run ------------------------------------------------------------------


@dataclass
class _Streams:
    fp: torch.Tensor  # input of the current block along the full-precision model
    q: torch.Tensor   # input of the current block along the quantized model


class _Run:
    """One calibration run over the blocks of a model."""

    def __init__(self, model, prefix, blocks, plan, config, method_cls, device, export, weights):
        self.model, self.prefix, self.blocks, self.plan = model, prefix, blocks, plan
        self.config: QuantConfig = config
        self.method_cls: type[Method] = method_cls
        self.device: torch.device = device
        self.export = export
        self.weights: ResidentWeights = weights
        self.progress = config.progress and distributed.is_main()

    # --- the whole run ---

    def calibrate(self, tokens: torch.Tensor) -> list[BlockLog]:
        """Every block in turn; afterwards `streams` holds the last blocks' outputs and
        `store` the checkpoints (None without cache_dir)."""
        self.shard = distributed.WindowShard.of(tokens.shape[0])
        distributed.check_same_settings({"quantization settings": settings_digest(self._settings()),
                                         "calibration data": tensor_digest(tokens)})
        self.store = store = self._checkpoints(tokens)
        self.weights.load_outside(self.model)
        x, self.calls = capture_block_inputs(self.model, self.blocks, self.shard.take(tokens))
        self.weights.release_outside(self.model)
        streams = _Streams(x, x)
        logs: list[BlockLog] = []
        done = store.finished_blocks() if store else 0
        for i in range(done):
            logs.append(self._replay(i, store))
        if done:
            saved = store.load_streams(slice(self.shard.start, self.shard.stop))
            if set(saved) != {"fp", "q"} or saved["fp"].shape != x.shape or saved["q"].shape != x.shape:
                raise store.corrupt(store.streams_path, f"it does not hold the two streams of shape {list(x.shape)}")
            streams = _Streams(saved["fp"], saved["q"])
        outer = tqdm(total=len(self.blocks), initial=done, desc=f"{self.config.method} blocks",
                     unit="block", disable=not self.progress)
        try:
            for i in range(done, len(self.blocks)):
                log, streams, method = self._calibrate_block(i, streams)
                logs.append(log)
                if store:
                    self._save(store, i, method, log, streams)
                del method  # its stand-ins hold the block's full-precision weights
                outer.update(1)
                if log.loss_before:
                    outer.set_postfix_str(f"mse {log.loss_before['mse']:.3g}->{log.loss_after['mse']:.3g}")
        finally:
            outer.close()
        self.streams = streams
        return logs

    def _settings(self) -> dict[str, Any]:
        settings = self.config.fingerprint_dict()
        settings["device"] = self.device.type
        return settings

    def _checkpoints(self, tokens: torch.Tensor) -> CheckpointStore | None:
        if not self.config.cache_dir:
            return None
        fingerprint = {
            "model": self.weights.digest(self.model),
            "data": tensor_digest(tokens),
            "config": settings_digest(self._settings()),
        }
        with distributed.main_first():
            return CheckpointStore(self.config.cache_dir, fingerprint, len(self.blocks))

    def _save(self, store: CheckpointStore, i: int, method: Method, log: BlockLog, streams: _Streams) -> None:
        """Block i's checkpoint, with the streams of every rank's windows (written by rank 0)."""
        fp, q = (distributed.gather_windows(s, self.shard) for s in (streams.fp, streams.q))
        if distributed.is_main():
            store.save_block(i, method.learned_state(), dataclasses.asdict(log), {"fp": fp, "q": q})

    # --- one block ---

    def _layers(self, i: int, block: nn.Module) -> dict[str, tuple[nn.Module, LayerSpec]]:
        return {local: (block.get_submodule(local), spec) for local, spec in self.plan[i].items()}

    def _replay(self, i: int, store: CheckpointStore) -> BlockLog:
        """Rebuilds block i from its checkpoint."""
        block = self.blocks[i]
        self.weights.load_block(i, block)
        learned, log = store.load_block(i)
        method = self.method_cls(self.config, i, len(self.blocks))
        wrappers = method.setup(self._layers(i, block))
        try:  # what the file holds must be what this method learns for this block
            method.load_learned_state(learned)
            replayed = BlockLog(**{**log, "resumed": True})
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise store.corrupt(store.block_path(i), f"it does not hold block {i}'s state ({exc})") from exc
        self._finish(block, method, wrappers)
        self.weights.release_block(i, block)
        return replayed

    def _finish(self, block: nn.Module, method: Method, wrappers: dict[str, nn.Module]) -> None:
        """Installs the exported modules, or the frozen stand-ins when not exporting."""
        if self.export:
            with torch.no_grad():
                _install(block, {local: method.export(local, w) for local, w in wrappers.items()})
        else:
            for w in wrappers.values():
                w.requires_grad_(False)
            _install(block, wrappers)

    def _calibrate_block(self, i: int, streams: _Streams) -> tuple[BlockLog, _Streams, Method]:
        started = time.perf_counter()
        block = self.blocks[i]
        self.weights.load_block(i, block)
        home = _device_of(block)
        block.to(self.device)
        trainable = [p for p in block.parameters() if p.requires_grad]
        block.requires_grad_(False)
        call = self.calls[i].to(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        log = BlockLog(i, f"{self.prefix}.{i}", [s.name for s in self.plan[i].values()])

        targets = [self._forward(block, streams.fp, call)]
        if self.config.aug_loss:
            targets.append(self._forward(block, streams.q, call))
        method = self.method_cls(self.config, i, len(self.blocks))
        wrappers = method.setup(self._layers(i, block))
        _install(block, wrappers)
        if wrappers:
            method.fit(lambda: self._forward(block, streams.q, call))
            log.loss_before = self._metrics(i, self._forward(block, streams.q, call), targets[0])
            log.epochs = self._train(i, block, method, streams.q, targets, call)
            with torch.no_grad():
                exported = {local: method.export(local, w) for local, w in wrappers.items()}
            _install(block, exported)
        with dense_weights(block):
            next_q = self._forward(block, streams.q, call)
        if wrappers:
            log.loss_after = self._metrics(i, next_q, targets[0])
            if not self.export:
                self._finish(block, method, wrappers)

        block.to(home)
        for p in trainable:
            p.requires_grad_(True)
        self.weights.release_block(i, block)
        if self.device.type == "cuda":
            log.peak_memory = torch.cuda.max_memory_allocated(self.device)
        log.seconds = time.perf_counter() - started
        if self.progress and log.loss_before:
            tqdm.write(
                f"block {i + 1}/{len(self.blocks)}: mse {log.loss_before['mse']:.4g} -> "
                f"{log.loss_after['mse']:.4g}, sw {log.loss_before['sw']:.4g} -> "
                f"{log.loss_after['sw']:.4g} ({log.seconds:.1f} s)"
            )
        return log, _Streams(targets[0], next_q), method

    def _autocast(self):
        if self.device.type == "cuda" and self.config.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _forward(self, block: nn.Module, inputs: torch.Tensor, call: BlockCall) -> torch.Tensor:
        """The block applied to every window, batch by batch; the result on the CPU."""
        outputs = []
        for idx in batches(inputs.shape[0], self.config.batch_size):
            with self._autocast():
                out = run_block(block, inputs[idx].to(self.device), call)
            outputs.append(out.to("cpu", inputs.dtype))
        return torch.cat(outputs)

    def _metrics(self, i: int, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """MSE and SW of outputs against target, batch by batch, with projections that
        are the same for every call on block i."""
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, i, "metrics"))
        sums: dict[str, float] = defaultdict(float)
        n = self.shard.total  # the mean over every rank's windows
        for idx in batches(outputs.shape[0], self.config.batch_size):
            _, terms = reconstruction_loss(
                outputs[idx].to(self.device), target[idx].to(self.device), 1.0,
                self.config.sw_projections, generator,
            )
            for k, v in terms.items():
                sums[k] += v.item() * len(idx) / n
        return distributed.sum_over_ranks(dict(sums))

    def _train(self, i, block, method: Method, inputs, targets, call) -> list[dict[str, Any]]:
        n, batch_size = self.shard.total, self.config.batch_size  # batches over every rank's windows
        per_epoch = math.ceil(n / batch_size)
        order = torch.Generator().manual_seed(derive_seed(self.config.seed, i, "batch order"))
        stages = method.stages()
        lengths = [s.steps if s.steps is not None else s.epochs * per_epoch for s in stages]
        bar = tqdm(total=sum(lengths), desc=f"block {i + 1}/{len(self.blocks)}", unit="step",
                   leave=False, disable=not self.progress)
        log = []
        try:
            for stage, steps in zip(stages, lengths):
                if steps == 0:
                    continue
                method.begin_stage(stage)
                optimizer = stage.optimizer(stage.param_groups)
                stream = batches(n, batch_size, order)
                sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
                count = 0
                for step in range(steps):
                    idx, share = self.shard.select(next(stream))  # this rank's windows of the batch
                    optimizer.zero_grad(set_to_none=True)
                    if len(idx) or not stage.needs_output:
                        pred = None  # a stage whose loss ignores the block output skips the forward pass
                        if stage.needs_output:
                            with self._autocast():
                                pred = run_block(block, inputs[idx].to(self.device), call).float()
                        batch_targets = [t[idx].to(self.device) for t in targets]
                        loss, terms = method.loss(pred, batch_targets, stage)
                        if share != 1.0:  # the gradients are summed over the ranks
                            loss, terms = loss * share, {k: v * share for k, v in terms.items()}
                        loss.backward()
                        sums["loss"] += loss.detach()
                        for k, v in terms.items():
                            sums[k] += v
                    distributed.sync_gradients(optimizer)
                    optimizer.step()
                    method.after_step(stage)
                    count += 1
                    bar.update(1)
                    if count == per_epoch or step == steps - 1:
                        entry = {"stage": stage.name, "epoch": len([e for e in log if e["stage"] == stage.name]) + 1}
                        totals = distributed.sum_over_ranks({k: v.item() for k, v in sums.items()})
                        entry.update({k: v / count for k, v in totals.items()})
                        if not math.isfinite(entry["loss"]):
                            raise CalibrationError(
                                f"lowbit: the training loss of block {i} became {entry['loss']} in "
                                f"stage {stage.name!r}; try a lower learning rate"
                            )
                        log.append(entry)
                        bar.set_postfix(epoch=entry["epoch"], loss=f"{entry['loss']:.4g}")
                        sums.clear()
                        count = 0
        finally:
            bar.close()
        return log


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
