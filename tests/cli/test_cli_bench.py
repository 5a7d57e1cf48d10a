"""`lowbit bench`: the kernel speed table and its refusals."""

import re

from cli_tools import assert_one_line_error, run
from helpers import fake_coldbench


def test_bench_prints_a_row_per_measurement(capsys):
    code, out, err = run(["bench", "--shapes", "96x128", "--m", "1", "3", "--bits", "2", "3",
                          "--rotate-mb", "0.5", "--seconds", "0.01", "--group-size", "32"], capsys)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("96x128")]
    assert [(r[1], r[2]) for r in rows] == [("1", "2"), ("1", "3"), ("3", "2"), ("3", "3")]
    for r in rows:
        lowbit_ms, fp32_ms, vs_fp32 = float(r[4]), float(r[5]), float(r[7].rstrip("x"))
        # the ratio of the two times, up to their rounding to 0.001 ms and its own to 0.01
        low, high = (fp32_ms - 5e-4) / (lowbit_ms + 5e-4), (fp32_ms + 5e-4) / max(lowbit_ms - 5e-4, 1e-9)
        assert low - 0.005 <= vs_fp32 <= high + 0.005
    assert re.search(r"M = 1: 2-bit \S+x, 3-bit \S+x", out)


def test_bench_refusals(capsys):
    code, _, err = run(["bench", "--shapes", "96x100"], capsys)
    assert_one_line_error(code, err, match="in_features must be a positive multiple of 32")
    code, _, err = run(["bench", "--shapes", "96by128"], capsys)
    assert_one_line_error(code, err, match="out_features x in_features")
    code, _, err = run(["bench", "--m", "0"], capsys)
    assert_one_line_error(code, err, 2, match="--m: must be at least 1")


def test_bench_with_llamacpp_adds_its_columns(capsys, tmp_path):
    coldbench = fake_coldbench(tmp_path / "coldbench")
    code, out, err = run(["bench", "--shapes", "96x256", "--m", "1", "--bits", "2", "3", "--rotate-mb", "0.5",
                          "--seconds", "0.01", "--group-size", "32", "--llamacpp", coldbench, "--markdown"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| shape"))
    assert header.endswith("| GB/s | ggml | ggml f32 ms | ggml ms | ggml vs f32 | repack ms | repack vs | lowbit/ggml |")
    rows = [line.split(" | ") for line in lines if line.startswith("| 96x256")]
    assert [r[10:13] for r in rows] == [["q2_K", "32.000", "2.000"], ["q3_K", "32.000", "-"]]
    assert all(len(r) == header.count("|") - 1 for r in rows)
    # the failed q3_K run: one line, after the table
    failures = [i for i, line in enumerate(lines) if line.startswith("# llama.cpp not measured:")]
    assert len(failures) == 1 and failures[0] > lines.index(header) + len(rows)
    assert lines[failures[0]].startswith("# llama.cpp not measured: q3_K 96 256 1 ")


def test_bench_refuses_a_missing_llamacpp_binary(capsys, tmp_path):
    code, _, err = run(["bench", "--llamacpp", str(tmp_path / "coldbench")], capsys)
    assert_one_line_error(code, err, match="coldbench is not an executable file")
