"""Shared fixtures: every op runs on each kernel backend built here.

`backend` is "cpu" (the CPU kernels), "simt" (the CUDA kernels on the SIMT executor) and,
where a GPU exists, "cuda". Tests take `backend` and `device` and wrap calls in
`vse_cuda.use_backend(backend)`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

import vse_cuda

from _loss_cases import BACKENDS


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped where none exists)")
    config.addinivalue_line("markers", "slow: long-running; CI runs them too")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Every test starts with the process's torch thread count: the trainer's --threads sets it
    for the whole process, and MKL's GEMM can round a tile's entries differently at another
    count (the copies of test_quintuplet's zero-margin test tie only at the usual one)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def device(backend) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


@pytest.fixture
def on_backend(backend):
    """Context manager factory: `with on_backend(): ...` runs ops on the test's backend."""
    return lambda: vse_cuda.use_backend(backend)


# Hypothesis (the properties of test_properties.py). One table of example counts per profile:
# "default" is what each property runs, i.e. the examples tried per op and backend; "slow" is
# what its @pytest.mark.slow twin (larger sizes) runs. "ci" is loaded unless
# --hypothesis-profile names another; "sanitize" keeps the simt reruns under ASan/TSan short.
# Every profile is derandomized and database-less, so each run tries the same examples.
HYPOTHESIS_EXAMPLES = {
    "ci": {"default": 300, "slow": 1000},
    "sanitize": {"default": 15, "slow": 15},
}
for _name, _counts in HYPOTHESIS_EXAMPLES.items():
    settings.register_profile(_name, max_examples=_counts["default"], derandomize=True, database=None,
                              deadline=None)
settings.load_profile("ci")


def hypothesis_examples(kind: str) -> int:
    """The loaded profile's count for `kind` ("default" or "slow"); a profile outside the table
    (e.g. hypothesis' own "default") gives its max_examples to both."""
    counts = HYPOTHESIS_EXAMPLES.get(settings.get_current_profile_name())
    return counts[kind] if counts else settings.default.max_examples
