"""The lowbit ops: `torch.ops.lowbit.{pack, unpack, dequantize, linear}`.

The kernels are registered in C++ (lowbit._C); this module adds what the
dispatcher needs from Python: fake implementations (meta tensors and
torch.compile) and the autograd formula of `linear` (gradient to x and bias,
none to the frozen quantized weight). The checks below mirror, message for
message, those of csrc/torch/checks.h, so meta tensors fail like real ones.
"""

from __future__ import annotations

import torch

from lowbit.errors import UsageError, UsageTypeError
from lowbit.kernels.extension import extension  # noqa: F401  (loading it registers the kernels)
from lowbit.format import BLOCK, FLOAT_DTYPES, check_bits, check_group_size, check_in_features, words_per_row


# --- checks of the fake implementations (temporary) ---------------------------------------


def _check_packed(packed: torch.Tensor, k: int, bits: int) -> None:
    if packed.dtype != torch.int32:
        raise UsageTypeError(f"lowbit: packed must be int32, got {packed.dtype}")
    if packed.dim() != 2 or packed.shape[1] != words_per_row(k, bits):
        raise UsageError(
            f"lowbit: packed must have shape [out_features, {words_per_row(k, bits)}] for "
            f"in_features={k} and bits={bits}, got {list(packed.shape)}"
        )


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise UsageTypeError(f"lowbit: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_weight(packed, scales, zeros, k: int, bits: int, group_size: int) -> None:
    check_bits(bits)
    check_in_features(k)
    check_group_size(group_size, k)
    _check_packed(packed, k, bits)
    n = packed.shape[0]
    _check_float(scales, "scales")
    if list(scales.shape) != [n, k // group_size]:
        raise UsageError(
            f"lowbit: scales must have shape [{n}, {k // group_size}], got {list(scales.shape)}"
        )
    if zeros.dtype != scales.dtype:
        raise UsageTypeError(
            f"lowbit: zeros must have the dtype of scales ({scales.dtype}), got {zeros.dtype}"
        )
    if zeros.shape != scales.shape:
        raise UsageError(
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
        raise UsageError("lowbit: x must have at least one dimension")
    _check_weight(packed, scales, zeros, x.shape[-1], bits, group_size)
    if x.device != packed.device:
        raise RuntimeError(f"lowbit: x is on {x.device} but the weight is on {packed.device}")
    if bias is not None:
        _check_float(bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != packed.shape[0]:
            raise UsageError(
                f"lowbit: bias must have shape [{packed.shape[0]}], got {list(bias.shape)}"
            )
        if bias.device != packed.device:
            raise RuntimeError(
                f"lowbit: bias is on {bias.device} but the weight is on {packed.device}"
            )


def in_features_of(packed: torch.Tensor, bits: int) -> int:
    """in_features of a packed weight: it follows from the row width (stored nowhere else)."""
    check_bits(bits)
    if packed.dim() != 2:
        raise UsageError(f"lowbit: packed must be 2-D, got {list(packed.shape)}")
    return packed.shape[1] // bits * BLOCK


# --- fake implementations ----------------------------------------------------------------


@torch.library.register_fake("lowbit::pack")
def _pack_fake(codes, bits):
    check_bits(bits)
    if codes.dtype != torch.uint8:
        raise UsageTypeError(f"lowbit: codes must be uint8, got {codes.dtype}")
    if codes.dim() != 2:
        raise UsageError(
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
    k = in_features_of(packed, bits)
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
