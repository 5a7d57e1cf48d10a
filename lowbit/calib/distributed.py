"""Calibration spread over the processes of a torch.distributed job (`torchrun`).

Every rank holds a contiguous shard of the calibration windows and their activation
streams. All ranks draw the same seeded batch order over all the windows; at each step a
rank computes the loss of the windows of the batch it holds, weighted by their share of
the batch, and the gradients of the trainable parameters are summed over the ranks: the
step is the single-process step on the whole batch, up to the order of the additions. So
the result does not depend on the number of ranks (beyond floating-point reduction
error), and per-block checkpoints (which keep whole streams) are interchangeable between
runs on any number of processes.

Outside a process group (or in a group of one) every helper is the identity, and the
single-process run computes exactly what it did before.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lowbit.errors import CalibrationError, UsageError

DEFAULT_TIMEOUT_S = 1800  # a collective waiting longer than this means a rank is gone

_cpu_group = None


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return world()[1] > 1


def is_main() -> bool:
    """Whether this process writes files and progress bars (rank 0)."""
    return world()[0] == 0


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_from_environment(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Joins the process group torchrun describes (NCCL for CUDA, gloo on CPUs); returns the
    device of this rank (cuda:LOCAL_RANK for CUDA)."""
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def shutdown(exit_code: int, failed: bool = False) -> None:
    """Leaves the process group, and has the process end at exit with `exit_code` through
    os._exit, once the output is flushed: gloo's threads abort a process now and then
    (std::terminate) in the interpreter's teardown when a peer has exited first, after a
    success as after a failure. After a failure the group is not destroyed either, since a
    peer may be gone."""
    global _cpu_group
    if dist.is_available() and dist.is_initialized():
        if not failed:
            dist.destroy_process_group()
        atexit.register(_exit_without_teardown, exit_code)
    _cpu_group = None


def _exit_without_teardown(exit_code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def _cpu() -> Any:
    """A gloo group for the CPU tensors (streams, logs); the default group for NCCL jobs
    carries only device tensors. Made on first use, which every rank reaches in the same order."""
    global _cpu_group
    if _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _cpu_group


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turns the error of a collective whose peer died or hung into one line."""
    try:
        yield
    except RuntimeError as exc:
        rank, size = world()
        raise CalibrationError(
            f"lowbit: rank {rank} of {size} lost the other ranks while {what} "
            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
            "run the same command with --resume to continue from the last finished block"
        ) from exc


# --- the windows of each rank ---------------------------------------------------------


@dataclass(frozen=True)
class WindowShard:
    """The calibration windows [start, stop) of `total` that this rank holds."""

    start: int
    stop: int
    total: int

    @classmethod
    def of(cls, total: int) -> WindowShard:
        rank, size = world()
        if size > total:
            raise UsageError(
                f"lowbit: {size} processes but only {total} calibration windows; every process needs at "
                "least one (raise nsamples or lower the number of processes)"
            )
        return cls(*_bounds(total, size)[rank], total)

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.total

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor over all windows."""
        return rows if self.whole else rows[self.start : self.stop]

    def select(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The local positions of the windows of a (global) batch that this rank holds, and
        their share of the batch."""
        if self.whole:
            return batch, 1.0
        mine = batch[(batch >= self.start) & (batch < self.stop)]
        return mine - self.start, len(mine) / len(batch)


def _bounds(total: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of every rank's windows: contiguous, sizes differing by at most one."""
    return [(r * total // size, (r + 1) * total // size) for r in range(size)]


# --- collectives --------------------------------------------------------------------------


def sync_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Sums the gradients of the parameters the optimizer trains over the ranks, in one
    all-reduce. A parameter that got no gradient anywhere keeps none (the optimizer skips
    it, as in a single process)."""
    if not is_distributed():
        return
    params = trainable_parameters(optimizer)
    if not params:
        return
    device = params[0].device
    flat = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=device)
            for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=device)
    buffer = torch.cat([*flat, present])
    with collective("summing gradients"):
        dist.all_reduce(buffer)
    offset = 0
    counts = buffer[-len(params):]
    for p, count in zip(params, counts.tolist()):
        part = buffer[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        p.grad = part.to(p.dtype).clone() if count > 0 else None


def sum_tensor(t: torch.Tensor, what: str) -> torch.Tensor:
    """t summed over the ranks (t itself in a single process)."""
    if not is_distributed():
        return t
    t = t.clone()
    with collective(what):
        dist.all_reduce(t)
    return t


def trainable_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters an optimizer updates, each once, in the order of its groups."""
    seen, params = set(), []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key's sum over the ranks (a key missing on a rank counts 0)."""
    if not is_distributed():
        return values
    gathered: list[dict[str, float]] = [{} for _ in range(world()[1])]
    with collective("summing the logs"):
        dist.all_gather_object(gathered, dict(values), group=_cpu())
    keys = list(dict.fromkeys(k for part in gathered for k in part))
    return {k: sum(part.get(k, 0.0) for part in gathered) for k in keys}


def check_same_settings(settings: dict[str, str]) -> None:
    """Refuses a job whose ranks run with different settings (digests by name)."""
    if not is_distributed():
        return
    gathered: list[dict[str, str]] = [{} for _ in range(world()[1])]
    with collective("comparing the settings"):
        dist.all_gather_object(gathered, settings, group=_cpu())
    for rank, other in enumerate(gathered):
        differing = sorted(k for k in settings if other.get(k) != gathered[0].get(k))
        if differing:
            raise UsageError(
                f"lowbit: rank {rank} runs with other {', '.join(differing)} than rank 0; every process "
                "must be started with the same model, data and settings"
            )


def gather_windows(local: torch.Tensor, shard: WindowShard) -> torch.Tensor | None:
    """The rows of all ranks in window order on rank 0 (None elsewhere)."""
    if not is_distributed():
        return local
    rank, size = world()
    bounds = _bounds(shard.total, size)
    rows = max(stop - start for start, stop in bounds)
    padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(size)] if rank == 0 else None
    with collective("collecting the streams"):
        dist.gather(padded, parts, dst=0, group=_cpu())
    if rank != 0:
        return None
    return torch.cat([part[: stop - start] for part, (start, stop) in zip(parts, bounds)])


def barrier() -> None:
    if is_distributed():
        with collective("waiting for the other ranks"):
            dist.barrier(group=_cpu())


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. creates a directory), the other ranks after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
