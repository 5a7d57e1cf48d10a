"""The choice of CUDA `linear` kernel, which is host code: checked on every machine,
GPU or not (the kernels themselves are in test_cuda.py)."""

import pytest
import torch
from helpers import random_quant_weight, rel_err

from lowbit import kernels
from lowbit.kernels import reference


def test_kernel_thresholds_by_rows():
    assert [kernels.cuda_linear_path(m) for m in (0, 1, 16)] == ["gemv"] * 3
    assert [kernels.cuda_linear_path(m, torch.bfloat16) for m in (17, 256)] == ["gemm"] * 2
    assert kernels.cuda_linear_path(257) == kernels.cuda_linear_path(4096) == "dequant_matmul"
    assert kernels.cuda_linear_path(1, torch.float32) == "dequant_matmul"


def test_kernel_choice_grows_with_rows():
    order = {"gemv": 0, "gemm": 1, "dequant_matmul": 2}
    choices = [order[kernels.cuda_linear_path(m)] for m in range(0, 2000, 7)]
    assert choices == sorted(choices)


def test_forcing_a_kernel_and_restoring_the_choice():
    with kernels.use_cuda_linear_path("gemm"):
        assert kernels.cuda_linear_path(1) == "gemm"
        with kernels.use_cuda_linear_path("dequant_matmul"):
            assert kernels.cuda_linear_path(1) == "dequant_matmul"
        assert kernels.cuda_linear_path(1) == "gemm"
        assert kernels.cuda_linear_path(1, torch.float32) == "dequant_matmul"
    assert kernels.cuda_linear_path(1) == "gemv"


def test_forced_choice_is_restored_after_an_error():
    with pytest.raises(RuntimeError, match="boom"), kernels.use_cuda_linear_path("gemm"):
        raise RuntimeError("boom")
    assert kernels.cuda_linear_path(1) == "gemv"


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match="unknown CUDA linear path 'cublas'"):
        kernels.set_cuda_linear_path("cublas")
    with kernels.use_cuda_linear_path("gemv"), pytest.raises(ValueError, match="at most 16 rows"):
        kernels.cuda_linear_path(17)
    with pytest.raises(TypeError, match="x must be float32"):
        kernels.cuda_linear_path(1, torch.int32)
    assert set(kernels.CUDA_LINEAR_PATHS) == {"gemv", "gemm", "dequant_matmul"}


def test_cpu_kernels_ignore_the_cuda_choice():
    _, packed, scales, zeros = random_quant_weight(9, 128, 3, 64)
    x = torch.randn(40, 128)
    with kernels.use_cuda_linear_path("gemv"):
        y = kernels.linear(x, packed, scales, zeros, 3, 64)
    assert rel_err(y, reference.linear(x, packed, scales, zeros, 3, 64)) < 1e-5
