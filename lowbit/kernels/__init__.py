"""The kernel layer: the lowbit ops (`torch.ops.lowbit.{pack, unpack, dequantize, linear}`),
their pure-torch reference, and the choice of kernel variant.

`lowbit.ops` is this namespace: `lowbit.ops.linear(...)`, `lowbit.ops.cpu_isa()`,
`lowbit.ops.use_cpu_exact()`.
"""

from lowbit.kernels.backends import (
    BF16_KERNELS,
    CUDA_LINEAR_PATHS,
    cpu_amx,
    cpu_amx_usable,
    cpu_exact,
    cpu_isa,
    cpu_linear_kernel,
    cuda_linear_path,
    set_cpu_amx,
    set_cpu_exact,
    set_cpu_isa,
    set_cuda_linear_path,
    supported_cpu_isas,
    use_cpu_amx,
    use_cpu_exact,
    use_cpu_isa,
    use_cuda_linear_path,
)
from lowbit.kernels.ops import dequantize, in_features_of, linear, pack, unpack

__all__ = [
    "BF16_KERNELS",
    "CUDA_LINEAR_PATHS",
    "cpu_amx",
    "cpu_amx_usable",
    "cpu_exact",
    "cpu_isa",
    "cpu_linear_kernel",
    "cuda_linear_path",
    "dequantize",
    "in_features_of",
    "linear",
    "pack",
    "set_cpu_amx",
    "set_cpu_exact",
    "set_cpu_isa",
    "set_cuda_linear_path",
    "supported_cpu_isas",
    "unpack",
    "use_cpu_amx",
    "use_cpu_exact",
    "use_cpu_isa",
    "use_cuda_linear_path",
]
