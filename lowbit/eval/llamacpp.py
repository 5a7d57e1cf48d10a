"""llama.cpp's CPU matmuls next to lowbit's: runs and reads ggml's `coldbench` anchor.

`coldbench` (source and build: shared/anchors/ggml-coldbench beside the checkout) times one
`ggml_mul_mat` of an N x K weight of a ggml type with M activation rows on llama.cpp's
CPU backend, cold (weights rotated through more memory than the cache), as lowbit's
`linear_table` does. Each lowbit bit width is compared with the k-quant of the nearest
size (`GGML_TYPES`), and each ggml type's speedup is taken over ggml's own f32 matmul,
as lowbit's over fp32 F.linear: ratios measured in one run, never absolute times
across machines.

    coldbench TYPE N K M1,M2,... MiB_M1 MiB_batched plain|repack SECONDS THREADS
"""

from __future__ import annotations

import math
import os
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lowbit.errors import UsageError
from lowbit.eval.speed import LinearRow, parse_shape

GGML_TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K"}  # lowbit bits -> the k-quant it is compared with
REPACKED = ("q4_K", "q2_K")  # types with a repacked (8x8-interleaved) layout, timed at M > 1
QK_K = 256  # the k-quants' block: K must be a multiple of it
ENV_VAR = "LOWBIT_COLDBENCH"


@dataclass
class ColdbenchLine:
    """One measurement line of coldbench's output; times in seconds."""

    type: str
    layout: str  # plain | repack
    m: int
    median: float
    min: float
    max: float
    gbps: float  # weight bytes per second, GB/s
    gflops: float
    rel_err: float


def parse_output(text: str) -> list[ColdbenchLine]:
    """The measurement lines of coldbench's stdout; comments, the header and anything
    that is not a complete measurement line are skipped."""
    lines = []
    for line in text.splitlines():
        cells = line.split()
        if len(cells) != 11 or cells[0].startswith("#"):
            continue
        try:
            median, low, high = (float(c) * 1e-6 for c in cells[5:8])
            lines.append(ColdbenchLine(cells[0], cells[1], int(cells[2]), median, low, high,
                                       float(cells[8]), float(cells[9]), float(cells[10])))
        except ValueError:  # the header, or a damaged line
            continue
    return [c for c in lines if math.isfinite(c.median) and c.median > 0]


class ColdbenchError(RuntimeError):
    """A coldbench run that exited with an error or printed no measurement."""


@dataclass
class Coldbench:
    """The coldbench binary at `path`, run with lowbit's timing settings."""

    path: str
    threads: int
    seconds: float
    rotate_mb: float  # weight copies add up to at least this many MB, at every M

    def __post_init__(self):
        if not (os.path.isfile(self.path) and os.access(self.path, os.X_OK)):
            raise UsageError(f"lowbit: llama.cpp's coldbench is not an executable file: {self.path}")

    def check(self) -> None:
        """One tiny run, so that a binary that cannot run here fails before the table."""
        probe = Coldbench(self.path, 1, 0.0, 0.0)
        try:
            probe.run("f32", 64, 64, [1])
        except ColdbenchError as exc:
            raise UsageError(f"lowbit: llama.cpp's coldbench does not run here: {exc}") from None

    def command(self, type: str, n: int, k: int, ms: Sequence[int], layout: str = "plain") -> list[str]:
        mib = f"{self.rotate_mb * 1e6 / 2**20:.1f}"
        return [self.path, type, str(n), str(k), ",".join(map(str, ms)), mib, mib, layout,
                f"{self.seconds:g}", str(self.threads)]

    def run(self, type: str, n: int, k: int, ms: Sequence[int], layout: str = "plain") -> dict[int, float]:
        """Median seconds per matmul at each M."""
        command = self.command(type, n, k, ms, layout)
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True)
        except OSError as exc:
            raise ColdbenchError(f"cannot run {self.path}: {exc.strerror or exc}") from exc
        times = {c.m: c.median for c in parse_output(done.stdout) if c.type == type and c.layout == layout}
        if done.returncode != 0 or not times:
            errors = done.stderr.strip().splitlines() or ["no measurement in its output"]
            why = next((line for line in errors if "GGML_ASSERT" in line), errors[-1]).strip()
            status = f"exit status {done.returncode}" if done.returncode >= 0 else f"signal {-done.returncode}"
            raise ColdbenchError(f"{' '.join(command[1:])}: {status}: {why}")
        return times


@dataclass
class ShapeTimes:
    """coldbench's medians for one weight shape, in seconds; `failures` says what is missing."""

    f32: dict[int, float] = field(default_factory=dict)
    plain: dict[str, dict[int, float]] = field(default_factory=dict)
    repack: dict[str, dict[int, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def time_shape(bench: Coldbench, n: int, k: int, ms: Iterable[int], bits: Iterable[int]) -> ShapeTimes:
    """ggml's f32 matmul and the k-quants matching `bits`, plain at every M and repacked at
    M > 1 where the type has a repacked layout."""
    ms = list(ms)
    result = ShapeTimes()

    def attempt(type: str, layout: str, at: list[int]) -> dict[int, float]:
        try:
            return bench.run(type, n, k, at, layout) if at else {}
        except ColdbenchError as exc:
            result.failures.append(str(exc))
            return {}

    result.f32 = attempt("f32", "plain", ms)
    for b in bits:
        t = GGML_TYPES[b]
        if k % QK_K:
            result.failures.append(f"{t} {n}x{k}: K is not a multiple of {QK_K}, the k-quants' block")
            continue
        result.plain[t] = attempt(t, "plain", ms)
        if t in REPACKED:
            result.repack[t] = attempt(t, "repack", [m for m in ms if m > 1])
    return result


# --- the table's extra columns ------------------------------------------------------------


class Columns:
    """llama.cpp's columns of lowbit's linear table (lowbit.eval.speed.linear_table): each
    shape is timed once, on its first row, between lowbit's measurements."""

    names = ("ggml", "ggml f32 ms", "ggml ms", "ggml vs f32", "repack ms", "repack vs", "lowbit/ggml")

    def __init__(self, bench: Coldbench, ms: Iterable[int], bits: Iterable[int]):
        self.bench, self.ms, self.bits = bench, list(ms), list(bits)
        self.shapes: dict[str, ShapeTimes] = {}

    def describe(self) -> str:
        return (f"# llama.cpp: {self.bench.path} (ggml CPU backend), {self.bench.threads} threads, weights "
                f"rotated over >= {self.bench.rotate_mb:.0f} MB; 'ggml vs f32', 'repack vs': speedups of "
                f"ggml's plain and repacked layouts over its own f32 matmul; 'lowbit/ggml': lowbit's time "
                f"over the faster ggml layout at matched bits "
                f"({', '.join(f'{b}-bit {t}' for b, t in GGML_TYPES.items())}; below 1: lowbit is faster)")

    def __call__(self, row: LinearRow) -> tuple[str, ...]:
        """The cells of one row of the table."""
        if row.shape not in self.shapes:
            self.shapes[row.shape] = time_shape(self.bench, *parse_shape(row.shape), self.ms, self.bits)
        times, t = self.shapes[row.shape], GGML_TYPES[row.bits]
        f32 = times.f32.get(row.m)
        plain = times.plain.get(t, {}).get(row.m)
        repack = times.repack.get(t, {}).get(row.m)

        def millis(s):
            return "-" if s is None else f"{s * 1e3:.3f}"

        def speedup(s):
            return "-" if s is None or f32 is None else f"{f32 / s:.2f}x"

        best = min((s for s in (plain, repack) if s is not None), default=None)
        ratio = "-" if best is None else f"{row.lowbit / best:.2f}"
        return t, millis(f32), millis(plain), speedup(plain), millis(repack), speedup(repack), ratio

    def failures(self) -> list[str]:
        """One line per coldbench run that failed or could not be made (its cells show '-')."""
        return [f"# llama.cpp not measured: {f}" for times in self.shapes.values() for f in times.failures]
