"""Shared fixtures: every op runs on each kernel backend built here.

`backend` is "cpu" (the CPU kernels), "simt" (the CUDA kernels on the SIMT executor) and,
where a GPU exists, "cuda". Tests take `backend` and `device` and wrap calls in
`vse_cuda.use_backend(backend)`.
"""

from __future__ import annotations

import pytest
import torch

import vse_cuda

BACKENDS = [
    "cpu",
    "simt",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]),
]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped where none exists)")
    config.addinivalue_line("markers", "slow: long-running; CI runs them too")


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
