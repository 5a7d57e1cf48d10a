"""The CPU kernels against the pure-torch reference, under every CPU variant this
machine can run, plus the ops' registration (opcheck, fake tensors, autograd)."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import TOLERANCE, random_quant_weight, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import kernels
from lowbit.kernels import reference

ISAS = kernels.supported_cpu_isas()
BITS = [2, 3, 4]
MS = [1, 2, 3, 4, 7, 16, 33, 128]
# Every variant in exact mode, and with the integer path (and the bf16 kernel)
# where it has one; the avx512 variant also in bf16 modes 'avx512' (vdpbf16ps)
# and 'off', so that every kernel it may take runs.
KERNELS = [(isa, exact, "auto") for isa in ISAS for exact in ((True,) if isa == "scalar" else (False, True))]
if "avx512" in ISAS:
    KERNELS += [("avx512", False, "avx512"), ("avx512", False, "off")]


def _kernels_id(case):
    isa, exact, bf16 = case
    return f"{isa}-{'exact' if exact else 'fast'}{'' if bf16 == 'auto' else '-bf16-' + bf16}"


@pytest.fixture(params=KERNELS, ids=_kernels_id)
def isa(request):
    name, exact, bf16 = request.param
    with kernels.use_cpu_isa(name), kernels.use_cpu_exact(exact), kernels.use_cpu_bf16(bf16):
        yield name


def reference_linear(x, *args):
    """The reference for what the active CPU kernels compute: x quantized the
    integer path's way, or x and W rounded to bf16, where those kernels run for
    x's number of rows."""
    kernel = kernels.cpu_linear_kernel(x.numel() // x.shape[-1])
    return reference.linear(x, *args, quantize_x=kernel == "q8-gemv",
                            round_to_bf16=kernel in kernels.BF16_KERNELS)


def tolerance(x_dtype, rows):
    """TOLERANCE, but for fp32 x through the bf16 kernel, whose tiles sum in
    another order than the reference: 1e-4."""
    bf16 = kernels.cpu_linear_kernel(rows) in kernels.BF16_KERNELS
    return 1e-4 if bf16 and x_dtype == torch.float32 else TOLERANCE[x_dtype]


def random_shape(group_size_kind):
    """Odd N and a K that fits the requested kind of group size."""
    n = 2 * int(torch.randint(1, 40, ())) + 1
    g = {"g32": 32, "g64": 64, "g128": 128}.get(group_size_kind)
    if g is None:  # per-channel
        k = 32 * int(torch.randint(1, 24, ()))
        return n, k, k
    k = g * int(torch.randint(1, max(2, 1024 // g), ()))
    return n, k, g


# --- pack / unpack -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 9),
    blocks=st.integers(1, 12),
    bits=st.sampled_from(BITS),
    data=st.data(),
)
def test_pack_matches_reference_and_round_trips(n, blocks, bits, data):
    k = 32 * blocks
    seed = data.draw(st.integers(0, 2**31 - 1))
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))
    packed = kernels.pack(codes, bits)
    assert packed.shape == (n, k * bits // 32)
    assert torch.equal(packed, reference.pack(codes, bits))
    assert torch.equal(kernels.unpack(packed, bits, k), codes)
    assert torch.equal(reference.unpack(packed, bits, k), codes)


def test_pack_layout_is_the_documented_one():
    """Spot checks of docs/FORMAT.md: fields are little-endian within words, and
    3-bit rows hold a 2-bit plane followed by a 1-bit plane."""
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 1] = 3
    assert kernels.pack(codes, 2).tolist() == [[3 << 2, 0]]
    assert kernels.pack(codes, 4).tolist() == [[3 << 4, 0, 0, 0]]
    codes[0, 1] = 0b101
    codes[0, 17] = 0b110
    assert kernels.pack(codes, 3).tolist() == [[1 << 2, 2 << 2, (1 << 1) | (1 << 17)]]


def test_pack_rejects_codes_out_of_range():
    codes = torch.full((2, 32), 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="below 2\\^bits"):
        kernels.pack(codes, 2)


# --- dequantize ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_kind", ["g32", "g64", "g128", "per-channel"])
def test_dequantize_matches_reference(bits, scale_dtype, group_kind):
    n, k, g = random_shape(group_kind)
    _, packed, scales, zeros = random_quant_weight(n, k, bits, g, scale_dtype)
    w = kernels.dequantize(packed, scales, zeros, bits, g)
    assert w.dtype == scale_dtype and w.shape == (n, k)
    torch.testing.assert_close(w, reference.dequantize(packed, scales, zeros, bits, g),
                               rtol=1e-6 if scale_dtype == torch.float32 else 1e-2, atol=0)


# --- linear --------------------------------------------------------------------------------


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_matches_reference(isa, m, bits, x_dtype):
    group_kind = ["g32", "g64", "g128", "per-channel"][int(torch.randint(0, 4, ()))]
    n, k, g = random_shape(group_kind)
    scale_dtype = [torch.float16, torch.bfloat16, torch.float32][int(torch.randint(0, 3, ()))]
    _, packed, scales, zeros = random_quant_weight(n, k, bits, g, scale_dtype)
    x = torch.randn(m, k).to(x_dtype)
    bias = torch.randn(n).to(scale_dtype) if torch.rand(()) < 0.5 else None
    y = kernels.linear(x, packed, scales, zeros, bits, g, bias)
    assert y.dtype == x_dtype and y.shape == (m, n)
    y_ref = reference_linear(x, packed, scales, zeros, bits, g, bias)
    assert rel_err(y, y_ref) < tolerance(x_dtype, m), (n, k, g, scale_dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("layout", ["strided-k", "transposed", "3-d"])
def test_linear_non_contiguous_and_batched_inputs(isa, bits, layout):
    n, k, g = 37, 256, 64
    _, packed, scales, zeros = random_quant_weight(n, k, bits, g)
    if layout == "strided-k":
        x = torch.randn(5, 2 * k)[:, ::2]
    elif layout == "transposed":
        x = torch.randn(k, 6).T
    else:
        x = torch.randn(3, 4, 2 * k)[:, :, k:]
    y = kernels.linear(x, packed, scales, zeros, bits, g)
    assert y.shape == (*x.shape[:-1], n)
    assert rel_err(y, reference_linear(x, packed, scales, zeros, bits, g)) < tolerance(torch.float32, x.numel() // k)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("shape", [(1536, 576), (577, 1536), (63, 96)], ids=str)
def test_linear_at_model_shapes(isa, bits, m, shape):
    """SmolLM2-135M's in_features 576 and 1536 (not multiples of the vector
    kernels' super-blocks) and a tiny one, through the GEMV and the GEMM."""
    n, k = shape
    g = 32 if k == 96 else 64
    _, packed, scales, zeros = random_quant_weight(n, k, bits, g, torch.float16)
    x = torch.randn(m, k)
    y = kernels.linear(x, packed, scales, zeros, bits, g)
    assert rel_err(y, reference_linear(x, packed, scales, zeros, bits, g)) < tolerance(torch.float32, m)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_integer_path_stays_within_its_error_bound(isa, bits, m):
    """|y - y_exact| <= sum_k |W[n, k]| * d[k / 32] / 2 (docs/KERNELS.md), with
    d = max|x| / 127 of each group of 32 inputs, plus fp32 rounding."""
    n, k, g = 45, 576, 64
    w_codes, packed, scales, zeros = random_quant_weight(n, k, bits, g, torch.float16)
    x = torch.randn(m, k) * torch.linspace(0.1, 10, k)  # groups of very different ranges
    y = kernels.linear(x, packed, scales, zeros, bits, g)
    y_exact = reference.linear(x, packed, scales, zeros, bits, g).double()
    w = reference.dequantize(packed, scales.float(), zeros.float(), bits, g).double()
    _, d = reference.quantize_activations(x)
    bound = 0.5 * d.double().repeat_interleave(reference.ACT_GROUP, -1) @ w.abs().T
    error = (y.double() - y_exact).abs()
    assert (error <= bound + 1e-5 * y_exact.abs().max()).all()
    if kernels.cpu_linear_kernel(m) == "q8-gemv":
        assert error.max() > 0  # the integer path ran and did quantize x
    else:
        assert rel_err(y, y_exact) < 1e-5


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sign", ["positive", "alternating"])
def test_integer_path_at_the_largest_codes_and_activations(isa, bits, sign):
    """Every code at 2^bits - 1 and every |x| quantized to 127: the integer
    accumulators' largest sums (no 16-bit or 32-bit overflow)."""
    n, k, g = 21, 1536, 64
    packed = kernels.pack(torch.full((n, k), 2**bits - 1, dtype=torch.uint8), bits)
    scales = torch.rand(n, k // g) + 0.5
    zeros = torch.rand(n, k // g)
    x = torch.full((3, k), 2.0)
    if sign == "alternating":  # by group, so that the products do not cancel
        x.view(3, -1, g)[:, ::2] = -2.0
    y = kernels.linear(x, packed, scales, zeros, bits, g)
    assert rel_err(y, reference_linear(x, packed, scales, zeros, bits, g)) < 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_give_nan_not_numbers(isa, bad):
    _, packed, scales, zeros = random_quant_weight(7, 96, 3, 32)
    x = torch.randn(2, 96)
    x[0, 40] = bad
    y = kernels.linear(x, packed, scales, zeros, 3, 32)
    assert not torch.isfinite(y[0]).any()
    assert torch.isfinite(y[1]).all()


def test_quantize_activations_rounds_half_to_even():
    x = torch.zeros(1, 64)
    x[0, :4] = torch.tensor([127.0, 2.5, -3.5, 0.49])
    q, d = reference.quantize_activations(x)
    assert d.tolist() == [[1.0, 0.0]]
    assert q[0, :4].tolist() == [127, 2, -4, 0]
    assert not q[0, 32:].any()


# --- the bf16 kernel -----------------------------------------------------------------------

BF16_MS = [12, 16, 17, 33, 64, 128, 129]


def bf16_kernels():
    """(mode, kernel name) of each bf16 kernel this machine runs."""
    if "avx512" not in ISAS:
        return []
    found = []
    with kernels.use_cpu_isa("avx512"), kernels.use_cpu_exact(False):
        for mode in ("auto", "avx512"):
            with kernels.use_cpu_bf16(mode):
                name = kernels.cpu_linear_kernel(16)
            if name in kernels.BF16_KERNELS:
                found.append((mode, name))
    return found


BF16_KERNEL_CASES = bf16_kernels()
needs_bf16 = pytest.mark.skipif(not BF16_KERNEL_CASES, reason="needs AVX-512 BF16 (avx512 kernels)")


@needs_bf16
@pytest.mark.parametrize("case", BF16_KERNEL_CASES, ids=lambda c: c[1])
@pytest.mark.parametrize("m", BF16_MS)
@pytest.mark.parametrize("bits", BITS)
def test_bf16_kernel_matches_reference_on_bf16_rounded_inputs(case, m, bits):
    """Odd N over several panels of 32 rows, K an odd multiple of 32 at times, every
    group size, activation rows that leave partial blocks of 16; outputs are
    poisoned (LOWBIT_POISON_OUTPUTS) so unwritten elements fail."""
    mode, name = case
    group_kind = ["g32", "g64", "g128", "per-channel"][int(torch.randint(0, 4, ()))]
    _, k, g = random_shape(group_kind)
    n = 2 * int(torch.randint(16, 60, ())) + 1
    scale_dtype = [torch.float16, torch.bfloat16, torch.float32][int(torch.randint(0, 3, ()))]
    _, packed, scales, zeros = random_quant_weight(n, k, bits, g, scale_dtype)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    with kernels.use_cpu_isa("avx512"), kernels.use_cpu_exact(False), kernels.use_cpu_bf16(mode):
        assert kernels.cpu_linear_kernel(m) == name
        y = kernels.linear(x, packed, scales, zeros, bits, g, bias)
    y_ref = reference.linear(x, packed, scales, zeros, bits, g, bias, round_to_bf16=True)
    assert rel_err(y, y_ref) < 1e-4, (n, k, g, scale_dtype)
    # and the rounding is really there: farther from the fp32 result than fp32 rounding
    y_exact = reference.linear(x, packed, scales, zeros, bits, g, bias)
    assert 1e-4 < rel_err(y, y_exact) < 2 * 2**-8


@needs_bf16
def test_bf16_kernel_is_not_used_in_exact_mode_for_few_rows_or_when_off():
    with kernels.use_cpu_isa("avx512"), kernels.use_cpu_exact(True):
        assert [kernels.cpu_linear_kernel(m) for m in (16, 128, 1000)] == ["gemm"] * 3
    with kernels.use_cpu_isa("avx512"), kernels.use_cpu_exact(False):
        assert kernels.cpu_linear_kernel(11) == "q8-gemv"
        with kernels.use_cpu_bf16("off"):
            assert [kernels.cpu_linear_kernel(m) for m in (16, 128)] == ["q8-gemv", "gemm"]
        with kernels.use_cpu_bf16("avx512"):
            assert kernels.cpu_linear_kernel(4096) == "avx512-bf16"
    with kernels.use_cpu_isa("avx512emu"), kernels.use_cpu_exact(False):
        assert kernels.cpu_linear_kernel(128) == "gemm"


def test_auto_bf16_mode_takes_amx_where_usable():
    if "avx512" not in ISAS:
        pytest.skip("needs the avx512 kernels")
    with kernels.use_cpu_isa("avx512"), kernels.use_cpu_exact(False), kernels.use_cpu_bf16("auto"):
        assert kernels.cpu_linear_kernel(128) == ("amx-bf16" if kernels.cpu_amx_usable() else "gemm")


def test_bf16_mode_from_the_environment_and_bad_modes():
    code = "import lowbit.ops as o; o.set_cpu_exact(False); print(o.cpu_bf16())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LOWBIT_CPU_BF16": "off"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["off"]
    with pytest.raises(ValueError, match="unknown bf16 mode"):
        kernels.set_cpu_bf16("amx")


def test_exact_mode_from_the_environment():
    code = "import lowbit.ops as o; print(o.cpu_exact(), o.cpu_linear_kernel(1))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LOWBIT_CPU_EXACT": "1"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "gemv"]


def test_every_vector_variant_is_tested_here():
    """The 16-lane logic of the AVX-512 kernels runs (emulated) wherever AVX2 does."""
    if "avx2" in ISAS:
        assert "avx512emu" in ISAS


def test_linear_of_an_empty_batch():
    _, packed, scales, zeros = random_quant_weight(5, 64, 2, 32)
    y = kernels.linear(torch.randn(0, 64), packed, scales, zeros, 2, 32)
    assert y.shape == (0, 5)


# --- errors --------------------------------------------------------------------------------


def _bad_linear_inputs():
    """(description, kwargs overrides, exception type, message fragment)."""
    return [
        ("bits", dict(bits=5), ValueError, "bits must be 2, 3 or 4"),
        ("group size", dict(group_size=48), ValueError, "group_size must be a multiple of 32"),
        ("group size not dividing K", dict(group_size=128, k=96), ValueError, "divides in_features"),
        ("K", dict(k=40), ValueError, "in_features must be a positive multiple of 32"),
        ("x dtype", dict(x_dtype=torch.int64), TypeError, "x must be float32"),
        ("packed dtype", dict(packed_dtype=torch.int64), TypeError, "packed must be int32"),
        ("packed shape", dict(packed_cols=3), ValueError, "packed must have shape"),
        ("scales shape", dict(scales_groups=3), ValueError, "scales must have shape"),
        ("scales dtype", dict(scales_dtype=torch.int32), TypeError, "scales must be float32"),
        ("zeros dtype", dict(zeros_dtype=torch.float32), TypeError, "zeros must have the dtype"),
        ("bias shape", dict(bias_len=4), ValueError, "bias must have shape"),
    ]


def _make_inputs(device, bits=2, group_size=32, k=64, x_dtype=torch.float32, packed_dtype=None,
                 packed_cols=None, scales_groups=None, scales_dtype=torch.float16,
                 zeros_dtype=None, bias_len=None):
    n = 3
    k_weight = k if k % 32 == 0 else 64  # a valid weight, so that x's K is what fails
    _, packed, scales, zeros = random_quant_weight(n, k_weight, 2, 32)
    if packed_cols is not None:
        packed = packed[:, :packed_cols]
    if packed_dtype is not None:
        packed = packed.to(packed_dtype)
    if scales_groups is not None:
        scales, zeros = scales[:, :1].repeat(1, scales_groups), zeros[:, :1].repeat(1, scales_groups)
    scales = scales.to(scales_dtype)
    zeros = zeros.to(zeros_dtype or scales_dtype)
    x = torch.randn(2, k).to(x_dtype)
    bias = torch.randn(bias_len) if bias_len else None
    return [t.to(device) if t is not None else None for t in (x, packed, scales, zeros)] + [
        bits, group_size, bias.to(device) if bias is not None else None]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", _bad_linear_inputs(), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_linear_rejects_bad_inputs_clearly(device, case):
    _, overrides, exc, fragment = case
    x, packed, scales, zeros, bits, g, bias = _make_inputs(device, **overrides)
    with pytest.raises(exc, match=fragment):
        kernels.linear(x, packed, scales, zeros, bits, g, bias)


def test_linear_rejects_mixed_devices():
    _, packed, scales, zeros = random_quant_weight(3, 64, 2, 32)
    with pytest.raises(RuntimeError, match="x is on meta but the weight is on cpu"):
        torch.ops.lowbit.linear(torch.empty(2, 64, device="meta"), packed, scales, zeros, 2, 32)


# --- registration --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_opcheck(bits):
    codes, packed, scales, zeros = random_quant_weight(9, 128, bits, 64)
    x = torch.randn(3, 128, requires_grad=True)
    bias = torch.randn(9)
    torch.library.opcheck(torch.ops.lowbit.pack.default, (codes, bits))
    torch.library.opcheck(torch.ops.lowbit.unpack.default, (packed, bits, 128))
    torch.library.opcheck(torch.ops.lowbit.dequantize.default, (packed, scales, zeros, bits, 64))
    torch.library.opcheck(torch.ops.lowbit.linear.default, (x, packed, scales, zeros, bits, 64, bias))
    torch.library.opcheck(torch.ops.lowbit.linear.default, (x, packed, scales, zeros, bits, 64, None))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_linear_gradients_match_reference(x_dtype):
    _, packed, scales, zeros = random_quant_weight(11, 96, 3, 32)
    x = torch.randn(2, 5, 96).to(x_dtype).requires_grad_()
    bias = torch.randn(11, requires_grad=True)
    grad_y = torch.randn(2, 5, 11).to(x_dtype)
    kernels.linear(x, packed, scales, zeros, 3, 32, bias).backward(grad_y)
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    reference.linear(x_ref, packed, scales, zeros, 3, 32, bias_ref).backward(grad_y)
    assert x.grad.dtype == x_dtype
    assert rel_err(x.grad, x_ref.grad) < TOLERANCE[x_dtype]
    assert rel_err(bias.grad, bias_ref.grad) < 1e-5
    assert packed.grad is None and scales.grad is None


def test_meta_tensors_give_shapes_and_dtypes():
    x = torch.empty(4, 7, 256, device="meta", dtype=torch.bfloat16)
    packed = torch.empty(33, 256 * 3 // 32, device="meta", dtype=torch.int32)
    scales = torch.empty(33, 4, device="meta", dtype=torch.float16)
    y = kernels.linear(x, packed, scales, scales, 3, 64)
    assert y.shape == (4, 7, 33) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    w = kernels.dequantize(packed, scales, scales, 3, 64)
    assert w.shape == (33, 256) and w.dtype == torch.float16
