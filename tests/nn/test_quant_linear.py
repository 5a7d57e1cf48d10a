"""QuantLinear as a module: construction, conversion, state, devices, dtypes, compile."""

import pytest
import torch
from helpers import random_quant_weight, rel_err
from torch import nn

from lowbit import kernels
from lowbit.kernels import reference
from lowbit.nn import QuantLinear
from lowbit.quant.grid import default_scale_dtype


def random_linear(k=256, n=77, bias=True, dtype=torch.float32):
    layer = nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_from_linear_is_round_to_nearest(bits, group_size):
    layer = random_linear()
    q = QuantLinear.from_linear(layer, bits, group_size)
    g = 256 if group_size == -1 else group_size
    assert (q.bits, q.group_size, q.scales.dtype) == (bits, g, torch.float16)
    w = layer.weight.detach()
    wq = q.dense_weight()  # exact in fp32: dequantize() would add its own fp16 rounding
    # Every weight lies within half a step of its group's scale (plus the rounding of the
    # scale to fp16, which stretches the grid by up to maxq * 2^-11 steps).
    step = q.scales.float().repeat_interleave(g, 1)
    assert ((wq - w).abs() <= (0.5 + (2**bits - 1) * 2**-11) * step + 1e-6).all()
    # Integer zeros inside the code range, codes use the full range somewhere.
    assert torch.equal(q.zeros, q.zeros.round()) and (q.zeros >= 0).all()
    assert (q.zeros <= 2**bits - 1).all() and q.codes().max() == 2**bits - 1


def test_forward_matches_dequantized_linear():
    layer = random_linear(k=576, n=99)
    q = QuantLinear.from_linear(layer, 3, 64)
    x = torch.randn(4, 5, 576)
    # The kernel uses the exact fp32 weight, not the fp16 one `dequantize()` returns.
    expected = x @ q.to(torch.float32).dequantize().T + q.bias
    assert rel_err(q(x), expected) < 1e-5


def test_decoding_takes_the_integer_path_by_default():
    """One token at a time on CPU: x quantized to int8 per 32 inputs (the default
    outside exact mode); longer inputs keep fp32 x, or go to bf16 where AMX is."""
    if kernels.cpu_isa() == "scalar":
        pytest.skip("the scalar kernels have no integer path")
    q = QuantLinear.from_linear(random_linear(k=576, n=99), 3, 64)
    x = torch.randn(1, 576)
    args = (q.packed, q.scales, q.zeros, q.bits, q.group_size, q.bias)
    with kernels.use_cpu_exact(False):
        assert kernels.cpu_linear_kernel(1) == "q8-gemv"
        assert rel_err(q(x), reference.linear(x, *args, quantize_x=True)) < 1e-5
        assert rel_err(q(x), reference.linear(x, *args)) > 1e-5
        x_long = torch.randn(33, 576)
        bf16 = kernels.cpu_linear_kernel(33) in kernels.BF16_KERNELS
        y_ref = reference.linear(x_long, *args, round_to_bf16=bf16)
        assert rel_err(q(x_long), y_ref) < (1e-4 if bf16 else 1e-5)


def test_from_quantized_accepts_codes_or_packed():
    codes, packed, scales, zeros = random_quant_weight(21, 128, 3, 32)
    bias = torch.randn(21).half()
    a = QuantLinear.from_quantized(codes, scales, zeros, bias, bits=3, group_size=32)
    b = QuantLinear.from_quantized(packed, scales, zeros, bias, bits=3, group_size=32)
    assert torch.equal(a.packed, packed) and torch.equal(b.packed, packed)
    assert torch.equal(a.codes(), codes)
    assert (a.in_features, a.out_features) == (128, 21)


def test_state_dict_round_trips_exactly():
    q = QuantLinear.from_linear(random_linear(), 2, 64)
    state = q.state_dict()
    assert set(state) == {"packed", "scales", "zeros", "bias"}
    fresh = QuantLinear(256, 77, 2, 64)
    fresh.load_state_dict(state)
    for name, t in fresh.state_dict().items():
        assert torch.equal(t, state[name]), name
    x = torch.randn(3, 256)
    assert torch.equal(fresh(x), q(x))


def test_loading_rejects_non_finite_scales_and_wrong_shapes():
    q = QuantLinear(256, 8, 2, 64)
    state = QuantLinear.from_linear(random_linear(n=8), 2, 64).state_dict()
    state["scales"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="scales contains NaN or Inf"):
        q.load_state_dict(state)
    with pytest.raises(RuntimeError, match="size mismatch for packed"):
        QuantLinear(256, 8, 3, 64).load_state_dict(
            QuantLinear.from_linear(random_linear(n=8), 2, 64).state_dict())


def test_constructor_and_conversion_reject_bad_settings():
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        QuantLinear(64, 8, 5, 32)
    with pytest.raises(ValueError, match="in_features must be a positive multiple of 32"):
        QuantLinear(48, 8, 2, 16)
    with pytest.raises(ValueError, match="group_size must be a multiple of 32"):
        QuantLinear(96, 8, 2, 64)
    with pytest.raises(TypeError, match="dtype must be"):
        QuantLinear(64, 8, 2, 32, dtype=torch.int8)
    bad = random_linear(k=64, n=4)
    with torch.no_grad():
        bad.weight[1, 3] = float("inf")
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        QuantLinear.from_linear(bad, 2, 32)
    with pytest.raises(TypeError, match="uint8 codes or int32 packed"):
        QuantLinear.from_quantized(torch.zeros(4, 64), torch.ones(4, 2), torch.ones(4, 2),
                                   bits=2, group_size=32)
    codes = torch.zeros(4, 64, dtype=torch.uint8)
    with pytest.raises(TypeError, match="zeros are torch.float32 but scales torch.float16"):
        QuantLinear.from_quantized(codes, torch.ones(4, 2).half(), torch.full((4, 2), 1.25), bits=2, group_size=32)
    for bad in (3.0, True, "3"):
        with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
            QuantLinear(64, 8, bad, 32)
    with pytest.raises(ValueError, match="in_features must be a positive multiple of 32"):
        QuantLinear(64.0, 8, 2, 32)


def test_huge_weights_need_fp32_scales():
    layer = random_linear(k=64, n=4)
    with torch.no_grad():
        layer.weight.mul_(1e7)
    with pytest.raises(ValueError, match="try scale_dtype=torch.float32"):
        QuantLinear.from_linear(layer, 2, 32)
    q = QuantLinear.from_linear(layer, 2, 32, scale_dtype=torch.float32)
    assert q.scales.dtype == torch.float32


def test_to_dtype_converts_scales_but_not_codes():
    q = QuantLinear.from_linear(random_linear(), 4, 64)
    packed = q.packed.clone()
    q.to(torch.bfloat16)
    assert q.scales.dtype == q.zeros.dtype == q.bias.dtype == torch.bfloat16
    assert q.packed.dtype == torch.int32 and torch.equal(q.packed, packed)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, reference.linear(x, q.packed, q.scales, q.zeros, 4, 64, q.bias)) < 1e-2


def test_meta_device_construction_allocates_nothing():
    q = QuantLinear(4096, 4096, 2, 64, device="meta")
    assert q.packed.device.type == "meta"
    y = q(torch.empty(3, 4096, device="meta", dtype=torch.float16))
    assert y.shape == (3, 4096) and y.dtype == torch.float16


def test_gradients_reach_inputs_not_weights():
    q = QuantLinear.from_linear(random_linear(), 2, 64)
    x = torch.randn(3, 256, requires_grad=True)
    q(x).sum().backward()
    expected = torch.ones(3, 77) @ reference.dequantize(q.packed, q.scales.float(), q.zeros.float(), 2, 64)
    assert rel_err(x.grad, expected) < 1e-5
    assert list(q.parameters()) == []


def test_extra_repr_names_the_format():
    q = QuantLinear(64, 8, 3, 32, bias=False)
    assert repr(q) == ("QuantLinear(in_features=64, out_features=8, bits=3, group_size=32, "
                       "bias=False, dtype=torch.float16)")


def test_bf16_weights_get_bf16_scales():
    assert default_scale_dtype(torch.bfloat16) == torch.bfloat16
    q = QuantLinear.from_linear(random_linear(dtype=torch.bfloat16), 2, 64)
    assert q.scales.dtype == torch.bfloat16


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = nn.Sequential(
        QuantLinear.from_linear(random_linear(k=128, n=96), 3, 32), nn.GELU(),
        QuantLinear.from_linear(random_linear(k=96, n=64), 2, 32),
    )
    x = torch.randn(5, 128)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    x2 = torch.randn(9, 128)  # a new batch size (dynamic shape on recompile)
    torch.testing.assert_close(compiled(x2), model(x2), rtol=1e-5, atol=1e-5)
