"""`QuantLinear`: a drop-in replacement for `torch.nn.Linear` with 2/3/4-bit weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import format
from lowbit.errors import UsageError, UsageTypeError
from lowbit.kernels import ops, reference
from lowbit.kernels.layouts import get_layout
from lowbit.nn.modules import linear_weight
from lowbit.quant.grid import check_finite, grouped, rtn


class QuantLinear(nn.Module):
    """y = x @ W^T + bias with W stored as packed b-bit codes and per-group scales and zeros.

    Buffers (the `state_dict`, in the canonical layout of docs/FORMAT.md):
      packed  int32 [out_features, in_features * bits / 32]
      scales  [out_features, in_features / group_size], dtype `dtype`
      zeros   like scales; W = scales * (codes - zeros) per group
      bias    [out_features], dtype `dtype` (optional)

    The weight is frozen: autograd reaches x (and a bias that requires grad),
    never the quantized weight. Inputs may be float32, float16 or bfloat16;
    the output has the input's dtype.

    Optional low-rank adapter (`attach_adapter`, e.g. from `apiq` calibration):
    y = x @ W^T + bias + scale * B (A x), kept beside the packed weight in full
    precision, with A, B trainable parameters (autograd reaches them and x) and its
    tensors in the `state_dict` as `adapter.A`, `adapter.B`, `adapter.scale`; loading
    such a state dict into a layer without an adapter attaches one. Without an
    adapter the layer and its `state_dict` are exactly the plain ones.
    `merge_and_requantize` folds the adapter into the codes for a pure low-bit layer.

    Kernel-private layouts (`prepack`): `packed` may hold the codes in a layout of
    `lowbit.kernels.layouts` (`self.layout`, None for the canonical one); the
    state_dict, `codes()`, `dequantize()` and `dense_weight()` always see the
    canonical form.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None = 64,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        format.check_bits(bits)
        format.check_in_features(in_features)
        group_size = format.resolve_group_size(group_size, in_features)
        format.check_group_size(group_size, in_features)
        format.check_float_dtype(dtype, "dtype")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = in_features // group_size
        words = format.words_per_row(in_features, bits)
        self.register_buffer("packed", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.adapter: LowRankAdapter | None = None
        self.layout: str | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        bits: int,
        group_size: int | None = 64,
        scale_dtype: torch.dtype | None = None,
    ) -> QuantLinear:
        """Round-to-nearest (asymmetric min-max per group) quantization of an nn.Linear
        (or a transformers Conv1D). Scales default to fp16 (bf16 for bf16 weights)."""
        codes, scales, zeros = rtn(linear_weight(linear).detach(), bits, group_size, scale_dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_quantized(codes, scales, zeros, bias, bits=bits, group_size=group_size)

    @classmethod
    def from_quantized(
        cls,
        codes_or_packed: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        bits: int,
        group_size: int | None,
    ) -> QuantLinear:
        """Builds a layer from codes (uint8 [N, K]) or packed words (int32), e.g. from calibration.
        The layer's dtype is that of `scales`; `zeros` must have it too, `bias` is cast to it."""
        format.check_bits(bits)
        if codes_or_packed.dtype == torch.uint8:
            packed = ops.pack(codes_or_packed, bits)
            in_features = codes_or_packed.shape[1]
        elif codes_or_packed.dtype == torch.int32:
            packed = codes_or_packed
            in_features = ops.in_features_of(packed, bits)
        else:
            raise UsageTypeError(
                "lowbit: from_quantized takes uint8 codes or int32 packed words, got "
                f"{codes_or_packed.dtype}"
            )
        if zeros.dtype != scales.dtype:  # a cast would move fractional zeros silently
            raise UsageTypeError(
                f"lowbit: from_quantized: zeros are {zeros.dtype} but scales {scales.dtype}; they must share "
                "one dtype (cast them explicitly)"
            )
        group_size = format.resolve_group_size(group_size, in_features)
        layer = cls(
            in_features, packed.shape[0], bits, group_size, bias is not None,
            dtype=scales.dtype, device=packed.device,
        )
        state = {"packed": packed, "scales": scales, "zeros": zeros}
        if bias is not None:
            state["bias"] = bias
        layer.load_state_dict(state)
        return layer

    @classmethod
    def concat_rows(cls, layers: list[QuantLinear]) -> QuantLinear:
        """One layer whose outputs are those of `layers`, in order (q, k and v; gate and up):
        their rows stacked. Exact, since every output row has its own codes, scales and
        zeros; the layers must share in_features, bits, group size and dtype, and carry no
        adapter."""
        if not layers:
            raise UsageError("lowbit: concat_rows needs at least one layer")
        first = layers[0]
        for layer in layers:
            reason = concat_rows_mismatch(first, layer)
            if reason:
                raise UsageError(f"lowbit: cannot stack the rows of these layers: {reason}")
        biases = [layer.bias for layer in layers]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            biases = [torch.zeros(layer.out_features, dtype=first.scales.dtype, device=first.packed.device)
                      if b is None else b for layer, b in zip(layers, biases)]
        bias = None if biases[0] is None else torch.cat(biases)
        return cls.from_quantized(
            torch.cat([layer.canonical_packed() for layer in layers]),
            torch.cat([layer.scales for layer in layers]), torch.cat([layer.zeros for layer in layers]),
            bias, bits=first.bits, group_size=first.group_size)

    # --- kernel-private layouts ----------------------------------------------------------

    def prepack(self, layout: str | None) -> QuantLinear:
        """Rearranges `packed` in place into `layout` (None: the canonical one), exactly."""
        canonical = self.canonical_packed()
        self.packed = canonical if layout is None else get_layout(layout).to_private(canonical, self.bits)
        self.layout = layout
        return self

    def canonical_packed(self) -> torch.Tensor:
        """`packed` in the canonical layout of docs/FORMAT.md."""
        if self.layout is None:
            return self.packed
        return get_layout(self.layout).to_canonical(self.packed, self.bits)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout is not None:
            destination[prefix + "packed"] = self.canonical_packed()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        layout = self.layout
        if layout is not None:  # canonical tensors load into the canonical form
            self.prepack(None)
        self._load_canonical_state(state_dict, prefix, *args, **kwargs)
        if layout is not None:
            self.prepack(layout)

    def _load_canonical_state(self, state_dict, prefix, *args, **kwargs):
        for name in ("scales", "zeros", "bias", "adapter.A", "adapter.B", "adapter.scale"):
            t = state_dict.get(prefix + name)
            if t is not None and t.is_floating_point():
                check_finite(t, f"{prefix}{name}")
        a = state_dict.get(prefix + "adapter.A")
        if a is not None and self.adapter is None:  # the children load after this
            self.attach_adapter(a.shape[0], dtype=a.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = ops.linear if self.layout is None else get_layout(self.layout).linear
        y = linear(x, self.packed, self.scales, self.zeros, self.bits, self.group_size, self.bias)
        if self.adapter is not None:
            y = y + self.adapter(x).to(y.dtype)
        return y

    # --- the low-rank adapter ----------------------------------------------------------

    def attach_adapter(
        self,
        rank: int,
        alpha: float | None = None,
        *,
        A: torch.Tensor | None = None,
        B: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LowRankAdapter:
        """Adds (or replaces) the adapter: scale = alpha / rank (alpha defaults to rank).
        A [rank, in_features] and B [out_features, rank] are copied when given;
        otherwise A is Kaiming-uniform and B zero, so the layer computes as before."""
        adapter = LowRankAdapter(self.in_features, self.out_features, rank,
                                 rank if alpha is None else alpha, dtype=dtype, device=self.packed.device)
        with torch.no_grad():
            for name, value in (("A", A), ("B", B)):
                if value is not None:
                    target = getattr(adapter, name)
                    if value.shape != target.shape:
                        raise UsageError(
                            f"lowbit: adapter {name} must have shape {list(target.shape)}, got {list(value.shape)}"
                        )
                    check_finite(value, f"adapter {name}")
                    target.copy_(value)
        self.adapter = adapter
        return adapter

    def dense_weight(self) -> torch.Tensor:
        """The float32 weight the layer computes with: dequantized codes plus, with an
        adapter, scale * B A. Dequantized by the pure-torch reference: any device, no kernel needed."""
        w = reference.dequantize(self.canonical_packed(), self.scales.float(), self.zeros.float(), self.bits, self.group_size)
        if self.adapter is not None:
            w = w + self.adapter.delta_weight()
        return w

    @torch.no_grad()
    def merge_and_requantize(self, grid: str = "same") -> QuantLinear:
        """A plain QuantLinear (no adapter) for W + scale * B A, rounded to nearest
        (`requantize`). Rounding the merged weight loses part of what the adapter learned:
        BENCHMARKS.md measures how much."""
        if self.adapter is None:
            raise UsageError("lowbit: this QuantLinear has no adapter to merge")
        return self.requantize(self.dense_weight(), grid)

    @torch.no_grad()
    def requantize(self, weight: torch.Tensor, grid: str = "same") -> QuantLinear:
        """A plain QuantLinear (no adapter) for `weight` [out_features, in_features], e.g.
        this layer's weight plus a fine-tuned change, rounded to nearest.

        grid="same" keeps this layer's scales and zeros (the calibrated clipping) and
        rounds `weight` onto them; grid="minmax" refits min-max scales and zeros per group."""
        self.check_weight_shape(weight)
        w = weight.float()
        if grid == "same":  # nearest code; zeros may be fractional in this format
            scales, zeros = self.scales, self.zeros
            q = grouped(w, self.group_size) / scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)
            codes = torch.round(q).clamp(0, 2**self.bits - 1).reshape(w.shape).to(torch.uint8)
        elif grid == "minmax":
            codes, scales, zeros = rtn(w, self.bits, self.group_size, self.scales.dtype)
        else:
            raise UsageError(f"lowbit: grid must be 'same' or 'minmax', got {grid!r}")
        bias = None if self.bias is None else self.bias.clone()
        return QuantLinear.from_quantized(codes, scales.clone(), zeros.clone(), bias,
                                          bits=self.bits, group_size=self.group_size)

    def check_weight_shape(self, weight: torch.Tensor) -> None:
        if weight.shape != (self.out_features, self.in_features):
            raise UsageError(f"lowbit: expected a weight of shape {[self.out_features, self.in_features]}, "
                             f"got {list(weight.shape)}")

    @property
    def qweight(self) -> torch.Tensor:
        """`packed`, under the name by which peft finds a quantized layer's device (an integer
        tensor, so adapters keep their own dtype)."""
        return self.packed

    def dequantize(self) -> torch.Tensor:
        """The weight W[out_features, in_features] in the scales' dtype."""
        return ops.dequantize(self.canonical_packed(), self.scales, self.zeros, self.bits, self.group_size)

    def codes(self) -> torch.Tensor:
        """The integer codes, uint8 [out_features, in_features]."""
        return ops.unpack(self.canonical_packed(), self.bits, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, dtype={self.scales.dtype}"
        )


def concat_rows_mismatch(first: QuantLinear, layer: nn.Module) -> str | None:
    """Why `layer`'s rows cannot be stacked under `first`'s, or None."""
    if type(layer) is not QuantLinear:
        return f"{type(layer).__name__} is not a plain QuantLinear"
    if layer.adapter is not None:
        return "a layer has a low-rank adapter"
    mine = (layer.in_features, layer.bits, layer.group_size, layer.scales.dtype, layer.packed.device)
    theirs = (first.in_features, first.bits, first.group_size, first.scales.dtype, first.packed.device)
    if mine != theirs:
        return f"(in_features, bits, group size, dtype, device) {mine} differ from {theirs}"
    return None


class LowRankAdapter(nn.Module):
    """The low-rank branch of a QuantLinear: delta y = scale * B (A x).

    A [rank, in_features] and B [out_features, rank] are parameters in `dtype`;
    `scale` (alpha / rank) is a float32 buffer so that checkpoints carry it. The
    product is computed in the wider of x's and the adapter's dtypes.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not (isinstance(rank, int) and rank >= 1):
            raise UsageError(f"lowbit: adapter rank must be a positive integer, got {rank!r}")
        if not math.isfinite(alpha):
            raise UsageError(f"lowbit: adapter alpha must be finite, got {alpha}")
        format.check_float_dtype(dtype, "adapter dtype")
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.register_buffer("scale", torch.tensor(alpha / rank, dtype=torch.float32, device=device))
        # The initialisation of nn.Linear and PEFT's LoRA: B = 0 makes the branch start at zero.
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, self.A.dtype)
        h = F.linear(x.to(dtype), self.A.to(dtype))
        return F.linear(h, self.B.to(dtype)) * self.scale.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, float32 [out_features, in_features]."""
        return (self.B.float() @ self.A.float()) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale.item():g}, dtype={self.A.dtype}"
