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
