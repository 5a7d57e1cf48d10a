"""The lowbit ops: `torch.ops.lowbit.{pack, unpack, dequantize, linear}`.

The kernels are registered in C++ (lowbit._C); this module adds what the
dispatcher needs from Python: fake implementations (meta tensors and
torch.compile) and the autograd formula of `linear` (gradient to x and bias,
none to the frozen quantized weight). The checks below mirror, message for
message, those of csrc/torch/checks.h, so meta tensors fail like real ones.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:
    from lowbit import _C
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "lowbit's compiled kernels (lowbit._C) are missing or do not match this torch. "
        "Build them with `pip install --no-build-isolation -e .` in the lowbit checkout, "
        f"using the torch you run with. Original error: {exc}"
    ) from exc

BLOCK = 32
SUPPORTED_BITS = (2, 3, 4)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# --- checks shared by the fake implementations -------------------------------------------


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"lowbit: bits must be 2, 3 or 4, got {bits}")


def check_in_features(k: int) -> None:
    if not (k > 0 and k % BLOCK == 0):
        raise ValueError(f"lowbit: in_features must be a positive multiple of 32, got {k}")


def check_group_size(group_size: int, k: int) -> None:
    if not (group_size > 0 and group_size % BLOCK == 0 and k % group_size == 0):
        raise ValueError(
            f"lowbit: group_size must be a multiple of 32 that divides in_features ({k}), "
            f"got {group_size}"
        )


def words_per_row(k: int, bits: int) -> int:
    return k // BLOCK * bits


def _check_packed(packed: torch.Tensor, k: int, bits: int) -> None:
    if packed.dtype != torch.int32:
        raise TypeError(f"lowbit: packed must be int32, got {packed.dtype}")
    if packed.dim() != 2 or packed.shape[1] != words_per_row(k, bits):
        raise ValueError(
            f"lowbit: packed must have shape [out_features, {words_per_row(k, bits)}] for "
            f"in_features={k} and bits={bits}, got {list(packed.shape)}"
        )


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lowbit: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_weight(packed, scales, zeros, k: int, bits: int, group_size: int) -> None:
    check_bits(bits)
    check_in_features(k)
    check_group_size(group_size, k)
    _check_packed(packed, k, bits)
    n = packed.shape[0]
    _check_float(scales, "scales")
    if list(scales.shape) != [n, k // group_size]:
        raise ValueError(
            f"lowbit: scales must have shape [{n}, {k // group_size}], got {list(scales.shape)}"
        )
    if zeros.dtype != scales.dtype:
        raise TypeError(
            f"lowbit: zeros must have the dtype of scales ({scales.dtype}), got {zeros.dtype}"
        )
    if zeros.shape != scales.shape:
        raise ValueError(
            f"lowbit: zeros must have shape {list(scales.shape)} like scales, got {list(zeros.shape)}"
        )
    if not (scales.device == packed.device == zeros.device):
        raise RuntimeError(
            f"lowbit: packed, scales and zeros must be on one device, got {packed.device}, "
            f"{scales.device}, {zeros.device}"
        )


def _check_linear(x, packed, scales, zeros, bits, group_size, bias) -> None:
    _check_float(x, "x")
    if x.dim() < 1:
        raise ValueError("lowbit: x must have at least one dimension")
    _check_weight(packed, scales, zeros, x.shape[-1], bits, group_size)
    if x.device != packed.device:
        raise RuntimeError(f"lowbit: x is on {x.device} but the weight is on {packed.device}")
    if bias is not None:
        _check_float(bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != packed.shape[0]:
            raise ValueError(
                f"lowbit: bias must have shape [{packed.shape[0]}], got {list(bias.shape)}"
            )
        if bias.device != packed.device:
            raise RuntimeError(
                f"lowbit: bias is on {bias.device} but the weight is on {packed.device}"
            )


def _in_features_of(packed: torch.Tensor, bits: int) -> int:
    check_bits(bits)
    if packed.dim() != 2:
        raise ValueError(f"lowbit: packed must be 2-D, got {list(packed.shape)}")
    return packed.shape[1] // bits * BLOCK


# --- fake implementations ----------------------------------------------------------------


@torch.library.register_fake("lowbit::pack")
def _pack_fake(codes, bits):
    check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"lowbit: codes must be uint8, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(
            f"lowbit: codes must be 2-D [out_features, in_features], got {list(codes.shape)}"
        )
    check_in_features(codes.shape[1])
    return codes.new_empty((codes.shape[0], words_per_row(codes.shape[1], bits)), dtype=torch.int32)


@torch.library.register_fake("lowbit::unpack")
def _unpack_fake(packed, bits, in_features):
    check_bits(bits)
    check_in_features(in_features)
    _check_packed(packed, in_features, bits)
    return packed.new_empty((packed.shape[0], in_features), dtype=torch.uint8)


@torch.library.register_fake("lowbit::dequantize")
def _dequantize_fake(packed, scales, zeros, bits, group_size):
    k = _in_features_of(packed, bits)
    _check_weight(packed, scales, zeros, k, bits, group_size)
    return scales.new_empty((packed.shape[0], k))


@torch.library.register_fake("lowbit::linear")
def _linear_fake(x, packed, scales, zeros, bits, group_size, bias=None):
    _check_linear(x, packed, scales, zeros, bits, group_size, bias)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# --- autograd ----------------------------------------------------------------------------


def _linear_setup_context(ctx, inputs, output):
    x, packed, scales, zeros, bits, group_size, bias = inputs
    ctx.save_for_backward(packed, scales, zeros)
    ctx.bits, ctx.group_size = bits, group_size
    ctx.x_dtype = x.dtype


def _linear_backward(ctx, grad_y):
    packed, scales, zeros = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        # fp32 scales give the exact fp32 weight that the forward pass used.
        w = torch.ops.lowbit.dequantize(packed, scales.float(), zeros.float(), ctx.bits, ctx.group_size)
        grad_x = (grad_y.float() @ w).to(ctx.x_dtype)
    # The bias argument is absent from the inputs when the caller left it out.
    has_bias = len(ctx.needs_input_grad) == 7
    if has_bias and ctx.needs_input_grad[6]:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).float().sum(0)
    return (grad_x, None, None, None, None, None) + ((grad_bias,) if has_bias else ())


torch.library.register_autograd(
    "lowbit::linear", _linear_backward, setup_context=_linear_setup_context
)

# --- Python entry points -----------------------------------------------------------------


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes[N, K] (uint8, each < 2**bits) -> packed[N, K * bits / 32] (int32)."""
    return torch.ops.lowbit.pack(codes, bits)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """packed[N, K * bits / 32] (int32) -> codes[N, K] (uint8)."""
    return torch.ops.lowbit.unpack(packed, bits, in_features)


def dequantize(packed, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """W[N, K] = scales * (codes - zeros), in the dtype of `scales`."""
    return torch.ops.lowbit.dequantize(packed, scales, zeros, bits, group_size)


def linear(x, packed, scales, zeros, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W^T (+ bias), fp32 accumulation, in x's dtype."""
    return torch.ops.lowbit.linear(x, packed, scales, zeros, bits, group_size, bias)


# --- CPU kernel variant ------------------------------------------------------------------


def cpu_isa() -> str:
    """The CPU kernel variant in use: 'scalar', 'avx2', 'avx512' or 'avx512emu'.

    'avx512emu' runs the 16-lane algorithm of the AVX-512 kernels on pairs of
    AVX2 registers; it exists to test that algorithm on CPUs without AVX-512
    and is used only when forced (LOWBIT_CPU_ISA or set_cpu_isa).
    """
    return _C.cpu_isa()


def supported_cpu_isas() -> list[str]:
    """CPU kernel variants that this build and this CPU can run (see cpu_isa)."""
    return list(_C.supported_cpu_isas())


def set_cpu_isa(name: str) -> None:
    """Forces a CPU kernel variant for the whole process."""
    _C.set_cpu_isa(name)


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Runs a block with the CPU kernel variant `name`, then restores the previous one."""
    previous = cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(previous)


# --- CUDA linear kernel ------------------------------------------------------------------

CUDA_LINEAR_PATHS = ("gemv", "gemm", "dequant_matmul")


def cuda_linear_path(rows: int, x_dtype: torch.dtype = torch.float16) -> str:
    """The CUDA kernel `linear` runs for `rows` rows of x (all leading dimensions
    flattened): 'gemv' (fused dequantize-GEMV, few rows), 'gemm' (fused
    tensor-core GEMM) or 'dequant_matmul' (dequantize the weight, then cuBLAS;
    always taken by float32 activations)."""
    return _C.cuda_linear_path(rows, x_dtype)


def set_cuda_linear_path(name: str) -> None:
    """Forces one CUDA linear kernel for the whole process ('auto' restores the
    automatic choice). For tests and benchmarks; float32 activations keep
    'dequant_matmul', and 'gemv' refuses more than 16 rows."""
    _C.set_cuda_linear_path(name)


@contextlib.contextmanager
def use_cuda_linear_path(name: str) -> Iterator[None]:
    """Runs a block with the CUDA linear kernel `name`, then restores the previous choice."""
    previous = _C.forced_cuda_linear_path()
    set_cuda_linear_path(name)
    try:
        yield
    finally:
        set_cuda_linear_path(previous)


def _apply_isa_from_environment() -> None:
    forced = os.environ.get("LOWBIT_CPU_ISA", "").strip()
    if forced and forced not in supported_cpu_isas():
        raise ValueError(
            f"LOWBIT_CPU_ISA={forced!r} cannot be used here; this build and CPU support "
            f"{', '.join(supported_cpu_isas())}"
        )


_apply_isa_from_environment()
