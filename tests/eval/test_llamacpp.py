"""lowbit.eval.llamacpp: reading llama.cpp's coldbench output and the table's llama.cpp
columns, on captured output and stand-in executables (the real binary is never needed)."""

import pytest
from helpers import executable, fake_coldbench

from lowbit.errors import UsageError
from lowbit.eval import llamacpp
from lowbit.eval.speed import LinearRow

# Real output of `coldbench q4_K 4096 4096 1,16,128 512 160 repack 1.0 2` (the ggml-coldbench
# anchor, llama.cpp of llama-cpp-python 0.3.36, AVX-512) on a busy machine; stderr left out.
Q4K_REPACK = """\
# coldbench type=q4_K bpw=4.5000 N=4096 K=4096 bytes=9437184 (9.00 MiB) buft=CPU_REPACK copies=57 threads=2 quantize=1.77s upload=0.77s
type     buft         M nodes   runs  median_us     min_us     max_us    W_GB/s    GFLOPS    rel_err
q4_K     repack       1    57      3     8314.4     8059.7     8491.2      1.14       4.0   7.29e-03
q4_K     repack      16    18      5    13309.3    12226.2    13578.8      0.71      40.3   7.05e-03
q4_K     repack     128    18      3    67124.3    64129.8    68221.6      0.14      64.0   7.05e-03
"""


def test_parse_output_reads_every_measurement_line():
    lines = llamacpp.parse_output(Q4K_REPACK)
    assert [(c.type, c.layout, c.m) for c in lines] == [("q4_K", "repack", 1), ("q4_K", "repack", 16),
                                                         ("q4_K", "repack", 128)]
    first = lines[0]
    assert first.median == pytest.approx(8314.4e-6) and first.min == pytest.approx(8059.7e-6)
    assert first.max == pytest.approx(8491.2e-6)
    assert (first.gbps, first.gflops, first.rel_err) == (1.14, 4.0, 7.29e-03)


def test_parse_output_skips_what_is_not_a_measurement():
    noise = "\n".join([
        "repack: repack tensor  with q4_K_8x8",
        "q4_K     repack       1    57      3     8314.4",  # cut short, as by a crash
        "q4_K     repack       8    57      3        nan     8059.7     8491.2      1.14       4.0   7.29e-03",
        "usage: ./coldbench TYPE N K M1,M2,... MiB_M1 MiB_batched plain|repack SECONDS THREADS",
        "",
    ])
    assert [c.m for c in llamacpp.parse_output(noise + "\n" + Q4K_REPACK)] == [1, 16, 128]
    assert llamacpp.parse_output(noise) == []


def test_columns_compare_matched_bits_and_report_failures(tmp_path):
    bench = llamacpp.Coldbench(fake_coldbench(tmp_path / "coldbench"), threads=2, seconds=0.1, rotate_mb=1)
    bench.check()
    columns = llamacpp.Columns(bench, ms=[1, 16], bits=[2, 3, 4])

    def row(m, bits, lowbit_ms):
        return LinearRow("64x256", m, bits, lowbit_ms * 1e-3, 1.0, 1.0, 1.0)

    # (fake_coldbench: 1 ms per weight bit at M = 1, 5x at M = 16; repacked: half; no q3_K.)
    # q2_K at M = 1: plain only (2 ms, 16x f32's 32 ms); lowbit's 1 ms is half of it.
    assert columns(row(1, 2, 1.0)) == ("q2_K", "32.000", "2.000", "16.00x", "-", "-", "0.50")
    # q4_K at M = 16: plain 20 ms, repack 10 ms (the faster one compared).
    assert columns(row(16, 4, 5.0)) == ("q4_K", "160.000", "20.000", "8.00x", "10.000", "16.00x", "0.50")
    assert columns(row(16, 3, 5.0)) == ("q3_K", "160.000", "-", "-", "-", "-", "-")
    [failure] = columns.failures()
    assert "q3_K 64 256 1,16" in failure and "no non-AMX extra buffer type" in failure
    assert failure.startswith("# llama.cpp not measured:")


def test_a_binary_that_cannot_run_is_refused_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="not an executable file"):
        llamacpp.Coldbench(str(tmp_path / "missing"), 2, 0.1, 1)
    crash = executable(tmp_path / "crash", "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    with pytest.raises(UsageError, match="does not run here: .*signal 4") as info:
        llamacpp.Coldbench(crash, 2, 0.1, 1).check()
    assert "\n" not in str(info.value)
    silent = executable(tmp_path / "silent", "print('hello')\n")
    with pytest.raises(UsageError, match="no measurement in its output"):
        llamacpp.Coldbench(silent, 2, 0.1, 1).check()


def test_k_quants_are_not_run_on_rows_that_are_not_whole_blocks(tmp_path):
    bench = llamacpp.Coldbench(fake_coldbench(tmp_path / "coldbench"), 2, 0.1, 1)
    columns = llamacpp.Columns(bench, ms=[1], bits=[4])
    assert columns(LinearRow("64x576", 1, 4, 1e-3, 1.0, 1.0, 1.0)) == ("q4_K", "32.000", "-", "-", "-", "-", "-")
    assert columns.failures() == ["# llama.cpp not measured: q4_K 64x576: K is not a multiple of 256, "
                                  "the k-quants' block"]
