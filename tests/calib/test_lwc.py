"""Learnable weight clipping: the fused fake quantizer and its exact export."""

import pytest
import torch
from torch import nn

from lowbit.calib.methods.lwc import ClippedLinear, fake_quantize, round_ste
from lowbit.kernels import reference


def composed(w, s, z, maxq):
    """The quantizer written as plain differentiable ops (OmniQuant's formulation)."""
    q = torch.clamp(round_ste(w / s) + z, 0, maxq)
    return (q - z) * s


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fused_fake_quantizer_matches_the_composed_ops(bits):
    maxq = 2**bits - 1
    w = torch.randn(33, 5, 64) * 0.05
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    s0 = (hi - lo) / maxq * 0.8  # clipped: some codes saturate, many sit on the bounds
    z = torch.round(-lo * 0.8 / s0).clamp(0, maxq)
    grad = torch.randn_like(w)
    results = []
    for f in (composed, fake_quantize):
        s = s0.clone().requires_grad_(True)
        out = f(w, s, z, maxq)
        (out * grad).sum().backward()
        results.append((out.detach(), s.grad))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_export_holds_exactly_the_trained_weights(bits, scale_dtype):
    linear = nn.Linear(128, 19, bias=True)
    layer = ClippedLinear(linear, bits, 32, scale_dtype)
    with torch.no_grad():  # some trained-looking clipping
        layer.upper.copy_(torch.rand_like(layer.upper) * 4 - 1)
        layer.lower.copy_(torch.rand_like(layer.lower) * 4 - 1)
    codes, scales, zeros = layer.quantized()
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert scales.dtype == zeros.dtype == scale_dtype
    assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 2**bits - 1
    packed = reference.pack(codes, bits)
    dequantized = reference._weight_f32(packed, scales, zeros, bits, 32)
    assert torch.equal(dequantized, layer.fake_weight().detach())
    exported = layer.to_quant_linear()
    x = torch.randn(7, 128)
    torch.testing.assert_close(exported(x), layer(x).detach(), rtol=1e-4, atol=1e-5)


def test_starts_near_min_max_and_learns_only_the_clipping():
    linear = nn.Linear(64, 8)
    layer = ClippedLinear(linear, 3, 32, torch.float16)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["upper", "lower"]
    assert torch.allclose(torch.sigmoid(layer.upper), torch.tensor(0.982), atol=1e-3)
    assert set(layer.state_dict()) == {"linear.weight", "linear.bias", "upper", "lower"}
    w = linear.weight.detach()
    assert (layer.fake_weight() - w).abs().max() < (w.amax() - w.amin()) / 7


def test_a_constant_sign_group_keeps_zero_in_range():
    linear = nn.Linear(32, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.rand(2, 32) + 0.5)  # all positive
    _, _, zeros = ClippedLinear(linear, 2, 32, torch.float16).quantized()
    assert torch.equal(zeros, torch.zeros_like(zeros))
