"""Random quantized weights, error measures and stand-in executables shared by the tests."""

import stat
import sys

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


def executable(path, python_source):
    """Writes a Python script to `path` as an executable file; returns its path as a str."""
    path.write_text(f"#!{sys.executable}\n{python_source}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


# llama.cpp's coldbench, as far as its arguments and output go: 1 ms per weight bit at M = 1
# (f32: 32 ms; a repacked layout: half its type's), times M's bit length (M = 16: 5x); no q3_K.
_FAKE_COLDBENCH = """
import sys
type, n, k, ms, _, _, layout, seconds, threads = sys.argv[1:]
if type == "q3_K":
    sys.exit("no non-AMX extra buffer type supports mul_mat of q3_K")
bits = {"f32": 32, "q2_K": 2, "q4_K": 4}[type] * (0.5 if layout == "repack" else 1)
print(f"# coldbench type={type} N={n} K={k} threads={threads}")
for m in map(int, ms.split(",")):
    us = 1000 * bits * m.bit_length()
    print(f"{type:<8} {layout:<8} {m:5d} {2:5d} {10:6d} {us:10.1f} {us:10.1f} {us:10.1f} 1.00 1.0 1.00e-03")
"""


def fake_coldbench(path):
    return executable(path, _FAKE_COLDBENCH)
