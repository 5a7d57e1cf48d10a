"""QuantLinear's optional low-rank adapter: forward, autograd, state_dict, merging."""

import io

import pytest
import torch
from helpers import random_quant_weight
from safetensors.torch import load, save
from torch import nn

from lowbit.kernels import reference
from lowbit.nn import LowRankAdapter, QuantLinear
from lowbit.nn.convert import dense_weights
from lowbit.quant.grid import grouped, rtn


def quant_linear(n=48, k=96, bits=3, group_size=32, bias=True, scale_dtype=torch.float16):
    codes, _, scales, zeros = random_quant_weight(n, k, bits, group_size, scale_dtype)
    b = torch.randn(n).to(scale_dtype) if bias else None
    return QuantLinear.from_quantized(codes, scales, zeros, b, bits=bits, group_size=group_size)


def with_random_adapter(layer, rank=8, alpha=4.0, dtype=torch.float32):
    A = torch.randn(rank, layer.in_features) / layer.in_features**0.5
    B = torch.randn(layer.out_features, rank) * 0.1
    layer.attach_adapter(rank, alpha, A=A, B=B, dtype=dtype)
    return layer, A.to(dtype).float(), B.to(dtype).float()


def expected_output(layer, x, A, B):
    """Dequantized weight in fp32 plus the adapter, computed densely in float64."""
    w = reference.dequantize(layer.packed, layer.scales.float(), layer.zeros.float(), layer.bits, layer.group_size).double()
    y = x.double() @ w.T + (layer.bias.double() if layer.bias is not None else 0)
    return y + layer.adapter.scale.double() * (x.double() @ A.double().T) @ B.double().T


@pytest.mark.parametrize("m", [1, 3, 7, 33])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16])
def test_forward_adds_the_low_rank_branch(m, bits, adapter_dtype):
    layer, A, B = with_random_adapter(quant_linear(bits=bits), dtype=adapter_dtype)
    x = torch.randn(m, layer.in_features)
    y = layer(x)
    assert y.dtype == x.dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), expected_output(layer, x, A, B), rtol=1e-4, atol=1e-4)


def test_adapter_starts_at_zero_and_plain_layers_are_unchanged():
    layer = quant_linear()
    x = torch.randn(5, layer.in_features)
    before = layer(x)
    keys = set(layer.state_dict())
    assert keys == {"packed", "scales", "zeros", "bias"} and layer.adapter is None
    adapter = layer.attach_adapter(16, 32.0)
    assert adapter.scale.item() == 2.0 and adapter.A.abs().sum() > 0 and adapter.B.abs().sum() == 0
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    assert set(layer.state_dict()) == keys | {"adapter.A", "adapter.B", "adapter.scale"}


def test_autograd_reaches_A_B_and_x_but_not_the_codes():
    layer, A, B = with_random_adapter(quant_linear(bias=False))
    x = torch.randn(4, 6, layer.in_features, requires_grad=True)
    grad_y = torch.randn(4, 6, layer.out_features)
    layer(x).backward(grad_y)
    A64, B64, x64 = (t.detach().double().requires_grad_() for t in (A, B, x))
    w = reference.dequantize(layer.packed, layer.scales.float(), layer.zeros.float(), layer.bits, layer.group_size).double()
    y64 = x64 @ w.T + layer.adapter.scale.double() * (x64 @ A64.T) @ B64.T
    y64.backward(grad_y.double())
    for got, want in ((layer.adapter.A.grad, A64.grad), (layer.adapter.B.grad, B64.grad), (x.grad, x64.grad)):
        assert got is not None and got.abs().sum() > 0
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert [n for n, p in layer.named_parameters()] == ["adapter.A", "adapter.B"]


def test_adapter_trains():
    """Optimiser steps on the adapter alone fit a low-rank change that the codes cannot."""
    layer = quant_linear(bias=False)
    layer.attach_adapter(8, 8.0)
    x = torch.randn(64, layer.in_features)
    change = torch.randn(layer.in_features, 4) @ torch.randn(4, layer.out_features) / layer.in_features
    target = layer(x).detach() + x @ change
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    first = None
    for _ in range(200):
        loss = (layer(x) - target).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_state_dict_round_trip_attaches_the_adapter(adapter_dtype):
    layer, _, _ = with_random_adapter(quant_linear(), rank=5, alpha=3.0, dtype=adapter_dtype)
    blob = save({k: v.contiguous() for k, v in layer.state_dict().items()})
    fresh = QuantLinear(layer.in_features, layer.out_features, layer.bits, layer.group_size, True)
    fresh.load_state_dict(load(blob))  # strict: no missing or unexpected keys
    assert fresh.adapter is not None and fresh.adapter.rank == 5 and fresh.adapter.A.dtype == adapter_dtype
    assert fresh.adapter.scale.item() == pytest.approx(3.0 / 5)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    again = QuantLinear(layer.in_features, layer.out_features, layer.bits, layer.group_size, True)
    again.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(again(x), layer(x), rtol=0, atol=0)


def test_loading_a_plain_state_dict_keeps_no_adapter_and_corrupt_adapters_are_refused():
    plain = quant_linear()
    layer = QuantLinear(plain.in_features, plain.out_features, plain.bits, plain.group_size, True)
    layer.load_state_dict(plain.state_dict())
    assert layer.adapter is None
    adapted, _, _ = with_random_adapter(quant_linear())
    state = adapted.state_dict()
    state["adapter.B"] = state["adapter.B"].clone()
    state["adapter.B"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="adapter.B"):
        QuantLinear(plain.in_features, plain.out_features, plain.bits, plain.group_size, True).load_state_dict(state)


def test_attach_adapter_checks_its_inputs():
    layer = quant_linear()
    with pytest.raises(ValueError, match="shape"):
        layer.attach_adapter(4, A=torch.randn(4, layer.in_features + 1))
    with pytest.raises(ValueError, match="NaN"):
        layer.attach_adapter(4, B=torch.full((layer.out_features, 4), float("nan")))
    with pytest.raises(ValueError, match="rank"):
        layer.attach_adapter(0)
    with pytest.raises(TypeError, match="dtype"):
        LowRankAdapter(8, 8, 2, 2.0, dtype=torch.float64)


@pytest.mark.parametrize("grid", ["same", "minmax"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_merge_and_requantize_gives_a_plain_quant_linear(grid, bits):
    layer, A, B = with_random_adapter(quant_linear(bits=bits))
    merged_weight = layer.dense_weight()
    merged = layer.merge_and_requantize(grid)
    assert type(merged) is QuantLinear and merged.adapter is None
    assert set(merged.state_dict()) == {"packed", "scales", "zeros", "bias"}
    assert merged.bits == bits and merged.group_size == layer.group_size
    codes = merged.codes()
    assert codes.max() < 2**bits
    if grid == "same":
        assert torch.equal(merged.scales, layer.scales) and torch.equal(merged.zeros, layer.zeros)
        # The nearest code of every merged weight (the zeros of this layer are fractional).
        q = grouped(merged_weight, layer.group_size) / layer.scales.float().unsqueeze(-1)
        q = torch.round(q + layer.zeros.float().unsqueeze(-1)).clamp(0, 2**bits - 1)
        assert torch.equal(codes, q.reshape(codes.shape).to(torch.uint8))
    else:
        want_codes, want_scales, want_zeros = rtn(merged_weight, bits, layer.group_size, layer.scales.dtype)
        assert torch.equal(codes, want_codes) and torch.equal(merged.scales, want_scales)
    assert torch.equal(merged.bias, layer.bias)
    # Rounding the merged weight gets closer to it than dropping the adapter.
    dropped = reference.dequantize(layer.packed, layer.scales.float(), layer.zeros.float(), layer.bits, layer.group_size)
    kept = merged.dense_weight()
    if grid == "same":
        assert (kept - merged_weight).norm() <= (dropped - merged_weight).norm()
    assert layer.adapter is not None  # the original layer is left as it was


def test_merge_without_adapter_and_unknown_grid_raise():
    with pytest.raises(ValueError, match="no adapter"):
        quant_linear().merge_and_requantize()
    layer, _, _ = with_random_adapter(quant_linear())
    with pytest.raises(ValueError, match="grid"):
        layer.merge_and_requantize("nearest")


def test_dense_weights_fold_the_adapter():
    layer, A, B = with_random_adapter(quant_linear())
    model = nn.Sequential(layer)
    x = torch.randn(7, layer.in_features)
    expected = model(x)
    with dense_weights(model):
        assert not isinstance(model[0], QuantLinear)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert model[0] is layer
