"""A small run of every lowbit CUDA kernel, for compute-sanitizer (check.sh).

Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own
allocation and an access past its end is reported. Shapes are small and odd:
K = 4128 is not a multiple of the 256-code span (and 2-bit rows are not
16-byte aligned), and 37 rows are too few to fill the GPU, so both fused
kernels split K across blocks.
"""

import torch

from lowbit import ops
from lowbit.kernels import reference


def main() -> None:
    torch.manual_seed(0)
    n, k, g = 37, 4128, 32
    for bits in (2, 3, 4):
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, device="cuda")
        packed = ops.pack(codes, bits)
        assert torch.equal(ops.unpack(packed, bits, k), codes)
        scales = (torch.rand(n, k // g, device="cuda") * 0.1 + 0.01).half()
        zeros = (torch.rand(n, k // g, device="cuda") * (2**bits - 1)).half()
        ops.dequantize(packed, scales, zeros, bits, g)
        bias = torch.randn(n, device="cuda").half()
        for kernel, rows in (("gemv", (1, 9)), ("gemm", (5, 70)), ("dequant_matmul", (3,))):
            for m in rows:
                for dtype in (torch.float16, torch.bfloat16):
                    x = torch.randn(m, k, device="cuda").to(dtype)
                    with ops.use_cuda_linear_path(kernel):
                        y = ops.linear(x, packed, scales, zeros, bits, g, bias)
                    y_ref = reference.linear(x, packed, scales, zeros, bits, g, bias)
                    err = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
                    assert err < 1e-2, (bits, kernel, m, dtype, err)
    torch.cuda.synchronize()
    print("sanitize_case: every kernel ran")


if __name__ == "__main__":
    main()
