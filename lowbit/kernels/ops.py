"""The lowbit ops: `torch.ops.lowbit.{pack, unpack, dequantize, linear}`.

The kernels are registered in C++ (lowbit._C); this module adds what the
dispatcher needs from Python: fake implementations (meta tensors and
torch.compile) and the autograd formula of `linear` (gradient to x and bias,
none to the frozen quantized weight). The fakes validate their arguments with
the bindings' own checks, so meta tensors fail like real ones.
"""

from __future__ import annotations

import torch

from lowbit.format import words_per_row
from lowbit.kernels.extension import extension


# --- checks -------------------------------------------------------------------------------
# One validation, in C++ (csrc/torch/checks.h): the bindings run it on real tensors,
# the fakes below on the metadata of fake and meta tensors.


def _meta(t: torch.Tensor) -> tuple[torch.dtype, list[int], str]:
    return t.dtype, [int(s) for s in t.shape], str(t.device)


def _meta_of_x(x: torch.Tensor) -> tuple[torch.dtype, list[int], str]:
    """Only x's rank and last size matter: its leading sizes stay symbolic."""
    return x.dtype, [1] * (x.dim() - 1) + ([int(x.shape[-1])] if x.dim() else []), str(x.device)


def in_features_of(packed: torch.Tensor, bits: int) -> int:
    """in_features of a packed weight: it follows from the row width (stored nowhere else)."""
    return extension.in_features_of(_meta(packed), bits)


# --- fake implementations ----------------------------------------------------------------


@torch.library.register_fake("lowbit::pack")
def _pack_fake(codes, bits):
    extension.check_pack(_meta(codes), bits)
    return codes.new_empty((codes.shape[0], words_per_row(codes.shape[1], bits)), dtype=torch.int32)


@torch.library.register_fake("lowbit::unpack")
def _unpack_fake(packed, bits, in_features):
    extension.check_unpack(_meta(packed), bits, in_features)
    return packed.new_empty((packed.shape[0], in_features), dtype=torch.uint8)


@torch.library.register_fake("lowbit::dequantize")
def _dequantize_fake(packed, scales, zeros, bits, group_size):
    k = extension.check_dequantize(_meta(packed), _meta(scales), _meta(zeros), bits, group_size)
    return scales.new_empty((packed.shape[0], k))


@torch.library.register_fake("lowbit::linear")
def _linear_fake(x, packed, scales, zeros, bits, group_size, bias=None):
    extension.check_linear(_meta_of_x(x), _meta(packed), _meta(scales), _meta(zeros), bits, group_size,
                           None if bias is None else _meta(bias))
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
