"""The kernel layer: the lowbit ops (`torch.ops.lowbit.{pack, unpack, dequantize, linear}`),
their pure-torch reference, and the choice of kernel variant.

`lowbit.ops` is this namespace: `lowbit.ops.linear(...)`, `lowbit.ops.cpu_isa()`,
`lowbit.ops.use_cpu_exact()`.
"""

from lowbit.kernels.backends import (
    BF16_KERNELS,
    BF16_MODES,
    CUDA_LINEAR_PATHS,
    cpu_amx_usable,
    cpu_bf16,
    cpu_exact,
    cpu_isa,
    cpu_linear_kernel,
    cuda_linear_path,
    set_cpu_bf16,
    set_cpu_exact,
    set_cpu_isa,
    set_cuda_linear_path,
    supported_cpu_isas,
    use_cpu_bf16,
    use_cpu_exact,
    use_cpu_isa,
    use_cuda_linear_path,
)
from lowbit.kernels.ops import dequantize, in_features_of, linear, pack, unpack

__all__ = [
    "BF16_KERNELS",
    "BF16_MODES",
    "CUDA_LINEAR_PATHS",
    "cpu_amx_usable",
    "cpu_bf16",
    "cpu_exact",
    "cpu_isa",
    "cpu_linear_kernel",
    "cuda_linear_path",
    "dequantize",
    "in_features_of",
    "linear",
    "pack",
    "set_cpu_bf16",
    "set_cpu_exact",
    "set_cpu_isa",
    "set_cuda_linear_path",
    "supported_cpu_isas",
    "unpack",
    "use_cpu_bf16",
    "use_cpu_exact",
    "use_cpu_isa",
    "use_cuda_linear_path",
]
