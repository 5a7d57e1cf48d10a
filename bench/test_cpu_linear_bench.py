"""pytest-benchmark suites: lowbit.kernels.linear against torch.nn.functional.linear
(fp32 and bf16 weights) on the CPU, cold weights (rotated over > 128 MB), in
inference mode.

    python -m pytest bench/test_cpu_linear_bench.py -m benchmark --benchmark-group-by=param:shape,param:m

bench/cpu_linear.py prints the same comparison as a table of ratios.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from lowbit import kernels
from lowbit.kernels import reference

pytestmark = pytest.mark.benchmark

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "576x576", "1536x576", "576x1536"]
MS = [1, 16, 128]
IMPLS = ["lowbit-2bit", "lowbit-3bit", "lowbit-4bit", "fp32", "bf16"]
GROUP_SIZE = 64
ROTATE_BYTES = 160e6
THREADS = 2


@pytest.fixture(scope="module", autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(previous)


def _copies(nbytes):
    return max(2, int(ROTATE_BYTES // nbytes) + 1)


def _calls(impl, n, k, m):
    """A list of zero-argument calls, one per weight copy."""
    x = torch.randn(m, k)
    if impl in ("fp32", "bf16"):
        dtype = torch.float32 if impl == "fp32" else torch.bfloat16
        xs = x.to(dtype)
        ws = [torch.randn(n, k).to(dtype) for _ in range(_copies(n * k * (4 if impl == "fp32" else 2)))]
        return [lambda w=w: F.linear(xs, w) for w in ws]
    bits = int(impl.split("-")[1][0])
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    packed = reference.pack(codes, bits)
    scales = (torch.rand(n, k // GROUP_SIZE) * 0.02 + 0.001).half()
    zeros = (torch.rand(n, k // GROUP_SIZE) * (2**bits - 1)).half()
    nbytes = packed.numel() * 4 + 4 * scales.numel()
    copies = [(packed.clone(), scales.clone(), zeros.clone()) for _ in range(_copies(nbytes))]
    return [lambda p=p, s=s, z=z: kernels.linear(x, p, s, z, bits, GROUP_SIZE) for p, s, z in copies]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_linear(benchmark, shape, m, impl):
    n, k = (int(v) for v in shape.split("x"))
    calls = itertools.cycle(_calls(impl, n, k, m))
    next(calls)()  # warm-up
    rounds = 30 if m == 1 else (10 if m == 16 else 4)
    benchmark.extra_info.update(shape=shape, m=m, impl=impl, isa=kernels.cpu_isa(), threads=THREADS)
    with torch.inference_mode():
        benchmark.pedantic(lambda: next(calls)(), rounds=rounds, iterations=1, warmup_rounds=1)
