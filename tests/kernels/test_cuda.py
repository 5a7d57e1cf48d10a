"""The CUDA kernels against the pure-torch reference and the CPU kernels, on fresh
random data: every kernel of `linear`, bit width, group size and activation dtype;
then CUDA graphs, opcheck and torch.compile on CUDA tensors. Every test needs a
GPU and is skipped without one (tests/conftest.py)."""

import pytest
import torch
from helpers import TOLERANCE, random_quant_weight, rel_err
from torch import nn

from lowbit import kernels
from lowbit.kernels import reference
from lowbit.nn import QuantLinear, quantize_rtn

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
BITS = [2, 3, 4]
MS = [1, 2, 3, 7, 16, 33, 128, 1024]
GROUP_KINDS = ["g32", "g64", "g128", "per-channel"]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Rows of x each kernel is tested at, around its tile boundaries.
PATH_ROWS = {
    "gemv": [1, 2, 3, 7, 8, 9, 16],
    "gemm": [1, 7, 16, 17, 33, 64, 65, 128, 300],
    "dequant_matmul": [1, 33, 300],
}


@pytest.fixture(autouse=True)
def _poison_free_memory():
    """Leaves the caching allocator's free blocks full of NaN bits, so that a kernel
    reading a workspace it never wrote fails; op outputs are poisoned already
    (LOWBIT_POISON_OUTPUTS=1)."""
    blocks = [torch.empty(size, dtype=torch.uint8, device=DEVICE) for size in
              [2**19] * 16 + [2**23] * 4 + [2**28]]
    for b in blocks:
        b.fill_(0xFF)
    del blocks
    yield


def random_int(low, high):
    return int(torch.randint(low, high + 1, ()))


def odd_rows(high=301):
    return 2 * random_int(0, (high - 1) // 2) + 1


def shape_for(group_kind, k):
    """(k, group size): k itself, or the next multiple of the group size when it does
    not divide k (576 with groups of 128 becomes 640)."""
    g = {"g32": 32, "g64": 64, "g128": 128}.get(group_kind)
    if g is None:
        return k, k
    return -(-k // g) * g, g


def random_group_kind():
    return GROUP_KINDS[random_int(0, len(GROUP_KINDS) - 1)]


def random_scale_dtype():
    return FLOAT_DTYPES[random_int(0, 2)]


def cuda_weight(n, k, bits, g, scale_dtype):
    return random_quant_weight(n, k, bits, g, scale_dtype, device=DEVICE)


def maybe_bias(n, dtype):
    return torch.randn(n, device=DEVICE).to(dtype) if torch.rand(()) < 0.5 else None


# --- linear against the reference ----------------------------------------------------------


@pytest.mark.parametrize("k", [576, 4096])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("group_kind", GROUP_KINDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
def test_linear_matches_reference(x_dtype, bits, group_kind, m, k):
    k, g = shape_for(group_kind, k)
    n, scale_dtype = odd_rows(), random_scale_dtype()
    _, packed, scales, zeros = cuda_weight(n, k, bits, g, scale_dtype)
    x = torch.randn(m, k, device=DEVICE).to(x_dtype)
    bias = maybe_bias(n, scale_dtype)
    y = kernels.linear(x, packed, scales, zeros, bits, g, bias)
    assert y.dtype == x_dtype and y.shape == (m, n)
    y_ref = reference.linear(x, packed, scales, zeros, bits, g, bias)
    err = rel_err(y, y_ref)
    assert err < TOLERANCE[x_dtype], (kernels.cuda_linear_path(m, x_dtype), n, k, g, scale_dtype, err)


@pytest.mark.parametrize(
    "path,m", [(path, m) for path, rows in PATH_ROWS.items() for m in rows]
)
@pytest.mark.parametrize("bits", BITS)
def test_every_kernel_matches_reference(path, m, bits):
    """Each kernel forced at row counts around its tiles, with a random K: mostly not
    a multiple of the GEMV's 256-code span or the GEMM's 64-code step, and (2 bits,
    K an odd multiple of 32) with rows that are not 16-byte aligned."""
    group_kind = random_group_kind()
    g = {"g32": 32, "g64": 64, "g128": 128}.get(group_kind, 32)
    k = g * random_int(1, 2048 // g)
    if group_kind == "per-channel":
        g = k
    n, scale_dtype = odd_rows(601), random_scale_dtype()
    x_dtype = [torch.float16, torch.bfloat16][random_int(0, 1)]
    _, packed, scales, zeros = cuda_weight(n, k, bits, g, scale_dtype)
    x = torch.randn(m, k, device=DEVICE).to(x_dtype)
    bias = maybe_bias(n, scale_dtype)
    with kernels.use_cuda_linear_path(path):
        assert kernels.cuda_linear_path(m, x_dtype) == path
        y = kernels.linear(x, packed, scales, zeros, bits, g, bias)
    err = rel_err(y, reference.linear(x, packed, scales, zeros, bits, g, bias))
    assert err < TOLERANCE[x_dtype], (n, k, g, x_dtype, scale_dtype, err)


@pytest.mark.parametrize("m", [1, 16, 33, 256])
@pytest.mark.parametrize("bits", BITS)
def test_linear_on_a_large_weight(m, bits):
    """Many row blocks and no split of K, as in real layers."""
    n, k, g = 4097, 4096, 64
    _, packed, scales, zeros = cuda_weight(n, k, bits, g, torch.float16)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    y = kernels.linear(x, packed, scales, zeros, bits, g)
    assert rel_err(y, reference.linear(x, packed, scales, zeros, bits, g)) < 1e-2


@pytest.mark.parametrize("m", [1, 40])
def test_float32_activations(m):
    n, k, g = 77, 512, 64
    _, packed, scales, zeros = cuda_weight(n, k, 3, g, torch.float32)
    x = torch.randn(m, k, device=DEVICE)
    bias = torch.randn(n, device=DEVICE)
    assert kernels.cuda_linear_path(m, torch.float32) == "dequant_matmul"
    y = kernels.linear(x, packed, scales, zeros, 3, g, bias)
    assert y.dtype == torch.float32
    assert rel_err(y, reference.linear(x, packed, scales, zeros, 3, g, bias)) < 1e-5


@pytest.mark.parametrize("path", list(PATH_ROWS))
@pytest.mark.parametrize("layout", ["strided-k", "transposed", "3-d", "misaligned"])
def test_linear_non_contiguous_and_batched_inputs(path, layout):
    n, k, g = 37, 256, 64
    _, packed, scales, zeros = cuda_weight(n, k, 2, g, torch.float16)
    if layout == "strided-k":
        x = torch.randn(5, 2 * k, device=DEVICE, dtype=torch.float16)[:, ::2]
    elif layout == "transposed":
        x = torch.randn(k, 6, device=DEVICE, dtype=torch.float16).T
    elif layout == "3-d":
        x = torch.randn(3, 4, 2 * k, device=DEVICE, dtype=torch.float16)[:, :, k:]
    else:  # rows that start 2 bytes past a 16-byte boundary
        x = torch.randn(4 * k + 1, device=DEVICE, dtype=torch.float16)[1:].view(4, k)
    with kernels.use_cuda_linear_path(path):
        y = kernels.linear(x, packed, scales, zeros, 2, g)
    assert y.shape == (*x.shape[:-1], n)
    assert rel_err(y, reference.linear(x, packed, scales, zeros, 2, g)) < 1e-2


def test_linear_of_an_empty_batch():
    _, packed, scales, zeros = cuda_weight(5, 64, 2, 32, torch.float16)
    y = kernels.linear(torch.randn(0, 64, device=DEVICE, dtype=torch.float16), packed, scales, zeros, 2, 32)
    assert y.shape == (0, 5)


@pytest.mark.parametrize("path", list(PATH_ROWS))
def test_linear_is_deterministic(path):
    n, k, g = 301, 4096, 64  # few rows: the GEMV and GEMM split K across blocks
    _, packed, scales, zeros = cuda_weight(n, k, 3, g, torch.float16)
    x = torch.randn(9, k, device=DEVICE, dtype=torch.bfloat16)
    with kernels.use_cuda_linear_path(path):
        first = kernels.linear(x, packed, scales, zeros, 3, g)
        for _ in range(3):
            assert torch.equal(kernels.linear(x, packed, scales, zeros, 3, g), first)


def test_linear_rejects_mixed_devices():
    _, packed, scales, zeros = random_quant_weight(3, 64, 2, 32)
    x = torch.randn(2, 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="x is on cuda:0 but the weight is on cpu"):
        kernels.linear(x, packed, scales, zeros, 2, 32)


def test_forced_gemv_refuses_many_rows():
    _, packed, scales, zeros = cuda_weight(3, 64, 2, 32, torch.float16)
    x = torch.randn(17, 64, device=DEVICE, dtype=torch.float16)
    with kernels.use_cuda_linear_path("gemv"), pytest.raises(ValueError, match="at most 16 rows"):
        kernels.linear(x, packed, scales, zeros, 2, 32)


# --- pack, unpack, dequantize: bit-identical to the CPU ------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_pack_and_unpack_equal_the_cpu_exactly(bits):
    n, k = odd_rows(), 32 * random_int(1, 100)
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    packed = kernels.pack(codes, bits)
    packed_gpu = kernels.pack(codes.to(DEVICE), bits)
    assert torch.equal(packed_gpu.cpu(), packed)
    assert torch.equal(kernels.unpack(packed_gpu, bits, k).cpu(), codes)


def test_pack_rejects_codes_out_of_range_on_cuda():
    codes = torch.full((2, 32), 4, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="below 2\\^bits"):
        kernels.pack(codes, 2)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scale_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("group_kind", GROUP_KINDS)
def test_dequantize_equals_the_cpu_exactly(bits, scale_dtype, group_kind):
    k, g = shape_for(group_kind, 32 * random_int(1, 40))
    n = odd_rows()
    _, packed, scales, zeros = random_quant_weight(n, k, bits, g, scale_dtype)
    w = kernels.dequantize(packed, scales, zeros, bits, g)
    w_gpu = kernels.dequantize(packed.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), bits, g)
    assert w_gpu.dtype == scale_dtype and torch.equal(w_gpu.cpu(), w)


# --- CUDA graphs, opcheck, autograd, torch.compile ----------------------------------------


@pytest.mark.parametrize("path", list(PATH_ROWS))
@pytest.mark.parametrize("bits", BITS)
def test_linear_inside_a_cuda_graph(path, bits):
    """Captured once, replayed on new inputs: the same result as eager execution."""
    m = 5 if path == "gemv" else 40
    n, k, g = 301, 4096, 64
    _, packed, scales, zeros = cuda_weight(n, k, bits, g, torch.float16)
    bias = torch.randn(n, device=DEVICE, dtype=torch.float16)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    with kernels.use_cuda_linear_path(path):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch asks
            kernels.linear(x, packed, scales, zeros, bits, g, bias)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = kernels.linear(x, packed, scales, zeros, bits, g, bias)
        for _ in range(2):
            x.copy_(torch.randn(m, k, device=DEVICE, dtype=torch.float16))
            graph.replay()
            expected = kernels.linear(x, packed, scales, zeros, bits, g, bias)
            torch.cuda.synchronize()
            if path == "dequant_matmul":  # cuBLAS may pick another algorithm under capture
                torch.testing.assert_close(y, expected, rtol=2e-3, atol=2e-3)
            else:
                assert torch.equal(y, expected)
    assert rel_err(y, reference.linear(x, packed, scales, zeros, bits, g, bias)) < 1e-2


@pytest.mark.parametrize("path", list(PATH_ROWS))
@pytest.mark.parametrize("bits", BITS)
def test_opcheck_on_cuda(path, bits):
    codes, packed, scales, zeros = cuda_weight(9, 128, bits, 64, torch.float16)
    x = torch.randn(3, 128, device=DEVICE, dtype=torch.float16, requires_grad=True)
    bias = torch.randn(9, device=DEVICE, dtype=torch.float16)
    with kernels.use_cuda_linear_path(path):
        torch.library.opcheck(torch.ops.lowbit.pack.default, (codes, bits))
        torch.library.opcheck(torch.ops.lowbit.unpack.default, (packed, bits, 128))
        torch.library.opcheck(torch.ops.lowbit.dequantize.default, (packed, scales, zeros, bits, 64))
        torch.library.opcheck(torch.ops.lowbit.linear.default, (x, packed, scales, zeros, bits, 64, bias))
        torch.library.opcheck(torch.ops.lowbit.linear.default, (x, packed, scales, zeros, bits, 64, None))


def test_gradients_on_cuda():
    _, packed, scales, zeros = cuda_weight(11, 96, 3, 32, torch.float16)
    x = torch.randn(2, 5, 96, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(11, device=DEVICE, requires_grad=True)
    grad_y = torch.randn(2, 5, 11, device=DEVICE, dtype=torch.bfloat16)
    kernels.linear(x, packed, scales, zeros, 3, 32, bias).backward(grad_y)
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    reference.linear(x_ref, packed, scales, zeros, 3, 32, bias_ref).backward(grad_y)
    assert rel_err(x.grad, x_ref.grad) < 1e-2
    assert rel_err(bias.grad, bias_ref.grad) < 1e-5


def test_quantlinear_on_cuda_follows_the_float_layer():
    linear = nn.Linear(1024, 333, device=DEVICE, dtype=torch.float16)
    q = QuantLinear.from_linear(linear, bits=4, group_size=64)
    assert q.packed.is_cuda
    x = torch.randn(7, 1024, device=DEVICE, dtype=torch.float16)
    y = q(x)
    assert rel_err(y, x.float() @ q.dequantize().float().T + q.bias.float()) < 1e-2
    assert rel_err(y, linear(x)) < 0.2  # 4-bit round-to-nearest of a random layer


def test_compiled_quantized_model_on_cuda():
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    model = model.to(DEVICE, torch.float16)
    quantize_rtn(model, bits=3, group_size=64, skip=())
    assert all(isinstance(model[i], QuantLinear) for i in (0, 2))
    compiled = torch.compile(model, fullgraph=True)
    for m in (1, 24):
        x = torch.randn(m, 256, device=DEVICE, dtype=torch.float16)
        assert rel_err(compiled(x), model(x)) < 1e-3
