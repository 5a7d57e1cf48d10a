"""`PermutedQuantLinear`: a QuantLinear that reads its input channels in a stored order.

GPTQ's act-order ("desc_act") assigns input channels to quantization groups in
a permuted order, recorded per channel in `g_idx`. lowbit's groups are runs of
consecutive channels, so such a layer is stored with its input channels sorted
by group and applies the same permutation to the activations:

    y = x[..., perm] @ Wp^T + bias,  Wp[:, j] = W[:, perm[j]]

which equals x @ W^T exactly.
"""

from __future__ import annotations

import torch

from lowbit.errors import UsageError
from lowbit.nn.quant_linear import QuantLinear


class PermutedQuantLinear(QuantLinear):
    """`QuantLinear` whose packed codes, scales and zeros are in the input order `input_perm`.

    Extra buffer: `input_perm` int32 [in_features], a permutation of 0..in_features-1.
    `dequantize()` and `codes()` return the weight in the original input order.
    """

    def __init__(self, *args, **kwargs):  # QuantLinear's arguments
        super().__init__(*args, **kwargs)
        self.register_buffer("input_perm", torch.arange(self.in_features, dtype=torch.int32,
                                                        device=self.packed.device))

    @classmethod
    def from_permuted(cls, layer: QuantLinear, input_perm: torch.Tensor) -> PermutedQuantLinear:
        """Wraps a layer whose weights are already stored in the order `input_perm`."""
        permuted = cls(
            layer.in_features,
            layer.out_features,
            layer.bits,
            layer.group_size,
            layer.bias is not None,
            layer.scales.dtype,
            layer.packed.device,
        )
        state = dict(layer.state_dict(), input_perm=input_perm.to(torch.int32))
        permuted.load_state_dict(state)
        return permuted

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        perm = state_dict.get(prefix + "input_perm")
        if perm is not None and not perm.is_meta:
            check_permutation(perm, self.in_features, prefix + "input_perm")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.index_select(-1, self.input_perm))

    def _unpermute(self, w: torch.Tensor) -> torch.Tensor:
        return w[:, torch.argsort(self.input_perm)]

    def dequantize(self) -> torch.Tensor:
        return self._unpermute(super().dequantize())

    def dense_weight(self) -> torch.Tensor:
        return self._unpermute(super().dense_weight())

    def requantize(self, weight: torch.Tensor, grid: str = "same") -> PermutedQuantLinear:
        """Rounds `weight` (in the original input order) in the stored order and keeps the
        permutation."""
        self.check_weight_shape(weight)
        stored = QuantLinear(self.in_features, self.out_features, self.bits, self.group_size,
                             self.bias is not None, self.scales.dtype, self.packed.device)
        stored.load_state_dict({k: v for k, v in self.state_dict().items()
                                if k != "input_perm" and not k.startswith("adapter.")})
        requantized = stored.requantize(weight[:, self.input_perm.long()], grid)
        return PermutedQuantLinear.from_permuted(requantized, self.input_perm)

    def codes(self) -> torch.Tensor:
        return self._unpermute(super().codes())


def check_permutation(perm: torch.Tensor, n: int, what: str) -> None:
    """Raises unless `perm` is an integer tensor holding each of 0..n-1 once."""
    ok = (
        perm.dim() == 1
        and perm.numel() == n
        and not perm.is_floating_point()
        and torch.equal(torch.sort(perm.long()).values, torch.arange(n, device=perm.device))
    )
    if not ok:
        raise UsageError(f"lowbit: {what} must be a permutation of 0..{n - 1}")
