"""Which kernel runs: the CPU instruction-set variant and the CUDA linear path.

Both are chosen automatically (the CPU variant from the CPU's features at load
time, the CUDA path from the number of rows of x); the functions here report
the choice and force another one for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from lowbit.errors import UsageError
from lowbit.kernels.extension import extension

# --- CPU kernel variant ------------------------------------------------------------------


def cpu_isa() -> str:
    """The CPU kernel variant in use: 'scalar', 'avx2', 'avx512' or 'avx512emu'.

    'avx512emu' runs the 16-lane algorithm of the AVX-512 kernels on pairs of
    AVX2 registers; it exists to test that algorithm on CPUs without AVX-512
    and is used only when forced (LOWBIT_CPU_ISA or set_cpu_isa).
    """
    return extension.cpu_isa()


@contextlib.contextmanager
def _temporarily(get: Callable[[], Any], set_: Callable[[Any], None], value: Any) -> Iterator[None]:
    """A process-wide kernel setting set to `value` for a block, restored after it."""
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


def supported_cpu_isas() -> list[str]:
    """CPU kernel variants that this build and this CPU can run (see cpu_isa)."""
    return list(extension.supported_cpu_isas())


def set_cpu_isa(name: str) -> None:
    """Forces a CPU kernel variant for the whole process."""
    extension.set_cpu_isa(name)


def use_cpu_isa(name: str) -> contextlib.AbstractContextManager[None]:
    """Runs a block with the CPU kernel variant `name`, then restores the previous one."""
    return _temporarily(cpu_isa, set_cpu_isa, name)


# --- CPU activations: integer path or exact ------------------------------------------------

def cpu_linear_kernel(rows: int) -> str:
    """The CPU kernel `linear` runs for `rows` rows of x (all leading dimensions
    flattened): 'amx-bf16' or 'avx512-bf16' (x and the decoded weight rounded to
    bf16, fp32 accumulation; from 12 rows on, outside exact mode, see cpu_bf16),
    'q8-gemv' (x quantized to int8 per 32 inputs, integer dot products; few rows,
    outside exact mode), 'gemv' or 'gemm' (fp32 x)."""
    return extension.cpu_linear_kernel(rows)


BF16_KERNELS = ("amx-bf16", "avx512-bf16")


BF16_MODES = ("auto", "avx512", "off")


def cpu_bf16() -> str:
    """How the CPU kernels multiply 16 rows or more outside exact mode (see
    docs/KERNELS.md): 'auto' (the default) in bf16 with AMX tiles where this CPU
    and OS allow them, else with the int8 and fp32 kernels; 'avx512' in bf16 with
    AVX-512 BF16 dot products (slower than the others on Sapphire Rapids: for
    comparisons and tests); 'off' never in bf16. LOWBIT_CPU_BF16 sets it at import."""
    return extension.cpu_bf16_mode()


def set_cpu_bf16(mode: str) -> None:
    """Sets the mode of cpu_bf16 for the whole process."""
    extension.set_cpu_bf16_mode(mode)


def use_cpu_bf16(mode: str) -> contextlib.AbstractContextManager[None]:
    """Runs a block in bf16 mode `mode`, then restores the previous one."""
    return _temporarily(cpu_bf16, set_cpu_bf16, mode)


def cpu_amx_usable() -> bool:
    """Whether this CPU has AMX bf16 tiles and Linux lets the process use them."""
    return extension.cpu_amx_usable()


def cpu_exact() -> bool:
    """Whether the CPU kernels keep x in fp32 for every number of rows
    (LOWBIT_CPU_EXACT=1 at import, or set_cpu_exact)."""
    return extension.cpu_exact_mode()


def set_cpu_exact(exact: bool) -> None:
    """True: fp32 activations everywhere (results within fp32 rounding of the
    reference); False (the default): the faster integer path for few rows and
    the bf16 kernel for 16 rows or more, whose error bounds docs/KERNELS.md gives."""
    extension.set_cpu_exact_mode(bool(exact))


def describe_cpu_kernels() -> str:
    """One line for reports: the threads, the variant, and the kernels of
    decoding (one row) and of prompts (many rows)."""
    decode, prompts = cpu_linear_kernel(1), cpu_linear_kernel(64)
    x = "int8 x" if decode == "q8-gemv" else "fp32 x"
    prompt_x = "bf16 x" if prompts in BF16_KERNELS else "fp32 x"
    return (f"{torch.get_num_threads()} threads, {cpu_isa()} kernels, {decode} ({x}) at one row, "
            f"{prompts} ({prompt_x}) for prompts")


def use_cpu_exact(exact: bool = True) -> contextlib.AbstractContextManager[None]:
    """Runs a block in (or out of) exact mode, then restores the previous mode."""
    return _temporarily(cpu_exact, set_cpu_exact, exact)


def check_isa_from_environment() -> None:
    """LOWBIT_CPU_ISA (read by the extension when it loads) must name a usable variant."""
    forced = os.environ.get("LOWBIT_CPU_ISA", "").strip()
    if forced and forced not in supported_cpu_isas():
        raise UsageError(
            f"LOWBIT_CPU_ISA={forced!r} cannot be used here; this build and CPU support "
            f"{', '.join(supported_cpu_isas())}"
        )
    bf16 = os.environ.get("LOWBIT_CPU_BF16", "").strip()
    if bf16 and bf16 not in BF16_MODES:
        raise UsageError(f"LOWBIT_CPU_BF16={bf16!r} is not one of {', '.join(BF16_MODES)}")


# --- CUDA linear kernel ------------------------------------------------------------------

CUDA_LINEAR_PATHS = ("gemv", "gemm", "dequant_matmul")


def cuda_linear_path(rows: int, x_dtype: torch.dtype = torch.float16) -> str:
    """The CUDA kernel `linear` runs for `rows` rows of x (all leading dimensions
    flattened): 'gemv' (fused dequantize-GEMV, few rows), 'gemm' (fused
    tensor-core GEMM) or 'dequant_matmul' (dequantize the weight, then cuBLAS;
    always taken by float32 activations)."""
    return extension.cuda_linear_path(rows, x_dtype)


def set_cuda_linear_path(name: str) -> None:
    """Forces one CUDA linear kernel for the whole process ('auto' restores the
    automatic choice). For tests and benchmarks; float32 activations keep
    'dequant_matmul', and 'gemv' refuses more than 16 rows."""
    extension.set_cuda_linear_path(name)


def use_cuda_linear_path(name: str) -> contextlib.AbstractContextManager[None]:
    """Runs a block with the CUDA linear kernel `name`, then restores the previous choice."""
    return _temporarily(extension.forced_cuda_linear_path, set_cuda_linear_path, name)


check_isa_from_environment()
