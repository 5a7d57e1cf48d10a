"""Builds the one native extension, lowbit._C.

The CPU kernels are always built: a portable baseline plus AVX2 and AVX-512
variants (x86-64 only) that are chosen at run time. The CUDA kernels are built
too whenever torch has CUDA and nvcc is found; set LOWBIT_CUDA=0 to skip them
or LOWBIT_CUDA=1 to fail loudly when they cannot be built. TORCH_CUDA_ARCH_LIST
is honoured, with an explicit default.

Build against the torch you already have: pip install --no-build-isolation .
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def find_cuda_home():
    """The toolkit root that nvcc itself reports (its `TOP`), or None.

    torch guesses CUDA_HOME from the nvcc on PATH, which is wrong when that
    nvcc is a wrapper outside the toolkit; nvcc's dry run names the real root.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
    return str(Path(match.group(1)).resolve()) if match else None


def want_cuda(torch_has_cuda, cuda_home):
    choice = os.environ.get("LOWBIT_CUDA", "").strip().lower()
    if choice in ("0", "false", "no", "off"):
        return False
    possible = torch_has_cuda and cuda_home is not None
    if choice in ("1", "true", "yes", "on") and not possible:
        raise RuntimeError(
            "LOWBIT_CUDA=1 but the CUDA kernels cannot be built: "
            + ("this torch has no CUDA" if not torch_has_cuda else "nvcc was not found")
        )
    return possible


def sources(folder, suffix):
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(f"*{suffix}"))


def extension():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension at import
    import torch
    from torch.utils import cpp_extension

    with_cuda = want_cuda(torch.version.cuda is not None, cuda_home)
    # -fopenmp: at::parallel_for is a header template that runs serially unless the
    # including code is compiled with OpenMP (torch's own libgomp is the runtime).
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    srcs = sources("csrc/cpu", ".cpp") + ["csrc/torch/ops.cpp"]
    kwargs = dict(
        name="lowbit._C",
        include_dirs=[str(ROOT / "csrc" / "include")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        print("lowbit: building the CPU kernels only")
        return cpp_extension.CppExtension(sources=srcs, **kwargs)

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    print(f"lowbit: building CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} with {cuda_home}")
    kwargs["extra_compile_args"] = {
        "cxx": cxx_flags + ["-DLOWBIT_WITH_CUDA"],
        "nvcc": ["-O3", "-lineinfo", "-DLOWBIT_WITH_CUDA", "--expt-relaxed-constexpr"],
    }
    srcs += sources("csrc/cuda", ".cu") + ["csrc/torch/ops_cuda.cpp"]
    return cpp_extension.CUDAExtension(sources=srcs, **kwargs)


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(ext_modules=[extension()], cmdclass={"build_ext": build_ext_class()})
