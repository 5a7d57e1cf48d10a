"""Random quantized weights and error measures shared by the tests."""

import torch

from lowbit.kernels import reference


def random_quant_weight(n, k, bits, group_size, scale_dtype=torch.float16, device="cpu"):
    """Random codes with random positive scales and fractional zeros: every term matters."""
    groups = k // group_size
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, groups) * 0.09 + 0.01).to(scale_dtype)
    zeros = (torch.rand(n, groups) * (2**bits - 1)).to(scale_dtype)
    packed = reference.pack(codes, bits)
    return codes.to(device), packed.to(device), scales.to(device), zeros.to(device)


def rel_err(y, y_ref):
    y, y_ref = y.double(), y_ref.double()
    return ((y - y_ref).norm() / y_ref.norm()).item()


TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
