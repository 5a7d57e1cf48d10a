"""Shared fixtures and the run's seeding.

pytest's default ("prepend") import mode puts this directory on sys.path, so the helper
modules here (tiny.py, helpers.py, gptq_reference.py) import by name from every test
folder. Test file names must be unique across the folders.
"""

import os
import random
import zlib

# Every op output starts as NaN / all-ones bits, so unwritten elements fail tests.
os.environ.setdefault("LOWBIT_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# A new seed per run (fresh random data), printed so that a failure can be replayed
# with LOWBIT_TEST_SEED=<seed>.
RUN_SEED = int(os.environ.get("LOWBIT_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"lowbit test seed: LOWBIT_TEST_SEED={RUN_SEED}"


@pytest.fixture(autouse=True)
def _seed_each_test(request):
    """Seeds torch per test from the run seed and the test id: fresh data each run,
    independent of test order, reproducible from the printed seed."""
    torch.manual_seed(RUN_SEED ^ zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _exact_cpu_kernels(monkeypatch):
    """Tests compare modules and algorithms with fp32 references, so the CPU kernels
    keep x in fp32 (exact mode), here and in the subprocesses tests start. The integer
    and bf16 paths are tested against their own references and error bounds in
    tests/kernels/test_ops.py, whose `isa` fixture turns them on."""
    from lowbit import kernels

    monkeypatch.setenv("LOWBIT_CPU_EXACT", "1")
    with kernels.use_cpu_exact(True):
        yield


def _cuda_unavailable_reason():
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU"
    from lowbit import _C

    if not _C.built_with_cuda():
        return "lowbit was built without its CUDA kernels (LOWBIT_CUDA=0)"
    return None


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped where there is no GPU or no CUDA build."""
    reason = _cuda_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """{"model": HF directory of a 2-block random Llama with its tokenizer, "text": a text
    file, "root": their directory} (tiny.tiny_hf_directory)."""
    from tiny import tiny_hf_directory

    return tiny_hf_directory(tmp_path_factory.mktemp("tiny-hf"))
