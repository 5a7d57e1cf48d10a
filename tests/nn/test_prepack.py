"""Kernel-private layouts: QuantLinear.prepack swaps its codes into a registered layout in
place, computes the same, and keeps the canonical form in its state_dict."""

import pytest
import torch

from lowbit.errors import UsageError
from lowbit.kernels import ops
from lowbit.kernels.layouts import LAYOUTS, Layout, register_layout
from lowbit.nn import QuantLinear


def _reversed_rows(packed, bits):
    return packed.flip(0).contiguous()


@pytest.fixture
def reversed_rows():
    """A test layout: the rows in reverse order, read by a linear that knows it."""
    layout = register_layout(Layout(
        "reversed-rows-test", _reversed_rows, _reversed_rows,
        lambda x, p, s, z, bits, g, bias=None: ops.linear(x, p.flip(0).contiguous(), s, z, bits, g, bias)))
    yield layout.name
    LAYOUTS.pop(layout.name)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prepacked_layer_computes_the_same_and_saves_canonical(reversed_rows, bits):
    layer = QuantLinear.from_linear(torch.nn.Linear(96, 37), bits, 32)
    x = torch.randn(3, 96)
    canonical = layer.packed.clone()
    y, state = layer(x), {k: v.clone() for k, v in layer.state_dict().items()}

    layer.prepack(reversed_rows)
    assert layer.layout == reversed_rows and not torch.equal(layer.packed, canonical)
    assert layer.packed.numel() == canonical.numel()  # replaced, not kept beside
    assert torch.equal(layer(x), y)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(layer.codes(), ops.unpack(canonical, bits, 96))
    assert torch.equal(layer.dequantize(), ops.dequantize(canonical, layer.scales, layer.zeros, bits, 32))

    other = QuantLinear.from_linear(torch.nn.Linear(96, 37), bits, 32).prepack(reversed_rows)
    other.load_state_dict(state)  # canonical tensors into a prepacked layer
    assert other.layout == reversed_rows and torch.equal(other(x), y)
    assert torch.equal(layer.prepack(None).packed, canonical)


def test_unknown_layout_is_refused():
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 8), 2, 32)
    with pytest.raises(UsageError, match="unknown layout 'nope'"):
        layer.prepack("nope")
    assert layer.layout is None
