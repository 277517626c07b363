"""Loading of the compiled libraries and the choice of kernel backend.

`_C` holds the product kernels (`torch.ops.vse_cuda`, CPU always, CUDA when compiled with
nvcc); `_simt` holds the same CUDA sources compiled by g++ for the SIMT executor
(`torch.ops.vse_simt`, tests only). Public functions reach kernels through :func:`ops`, which
honours :func:`use_backend` so the test-suite can run every op on every backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from typing import Iterator

import torch

_BACKENDS = ("cpu", "cuda", "simt")
_active_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("vse_backend", default=None)


def _load_product() -> None:
    """Loads the product library: `vse_cuda._C`, or the file named by VSE_C_LIBRARY (how
    `make test` swaps in the build with sanitizers)."""
    override = os.environ.get("VSE_C_LIBRARY")
    if override:
        torch.ops.load_library(override)
        return
    try:
        importlib.import_module("vse_cuda._C")
    except ImportError as error:  # pragma: no cover - exercised only on broken installs
        raise ImportError(
            "vse_cuda's compiled library is missing or does not match this PyTorch; "
            "rebuild it with `pip install --no-build-isolation -e .`"
        ) from error


_load_product()


@functools.cache
def _has_simt() -> bool:
    """Loads the SIMT library: `vse_cuda._simt`, or the file named by VSE_SIMT_LIBRARY
    (how `make test` swaps in the build with sanitizers)."""
    override = os.environ.get("VSE_SIMT_LIBRARY")
    if override:
        torch.ops.load_library(override)
        return True
    try:
        importlib.import_module("vse_cuda._simt")
    except ImportError:
        return False
    return True


def backends() -> tuple[str, ...]:
    """Kernel backends compiled into this build: "cpu" always, "cuda" when nvcc compiled the
    CUDA kernels (usable only where torch.cuda.is_available()), "simt" for the test-only
    executor that runs the CUDA kernels on CPU threads."""
    built = ["cpu"]
    if torch._C._dispatch_has_kernel_for_dispatch_key("vse_cuda::topk_similar", "CUDA"):
        built.append("cuda")
    if _has_simt():
        built.append("simt")
    return tuple(built)


def simt_ops():
    """`torch.ops.vse_simt`: the CUDA kernels run by the SIMT executor on CPU tensors."""
    if not _has_simt():
        raise RuntimeError("vse_cuda was built without the SIMT executor (VSE_SIMT=0)")
    return torch.ops.vse_simt


def use_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Run vse_cuda ops on one backend inside the block (for tests and benchmarks).

    "cpu" and "cuda" follow the tensors' device as usual; "simt" sends CPU tensors to the
    CUDA kernels compiled for the SIMT executor. A bad name raises here, at the call, not
    only on entering the ``with`` block.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, one of {_BACKENDS}, got {type(name).__name__}")
    if name not in _BACKENDS:
        raise ValueError(f"backend name must be one of {_BACKENDS}, got {name!r}")
    if name not in backends():
        raise RuntimeError(f"backend {name!r} is not compiled into this build; built: {backends()}")
    return _backend_block(name)


@contextlib.contextmanager
def _backend_block(name: str) -> Iterator[None]:
    token = _active_backend.set(name)
    try:
        yield
    finally:
        _active_backend.reset(token)


def ops(*tensors: torch.Tensor, names: tuple[str, ...] = ()):
    """The op namespace for these tensors under the active backend; ``names`` (of the
    caller's arguments, in order) go into the error when a tensor cannot run there."""
    if _active_backend.get() == "simt":
        for i, t in enumerate(tensors):
            if t.device.type != "cpu":
                name = names[i] if i < len(names) else f"input {i}"
                raise ValueError(f"{name} is on {t.device}, but the simt backend runs on CPU tensors only")
        return torch.ops.vse_simt
    if any(t.device.type == "cuda" for t in tensors) and "cuda" not in backends():
        raise RuntimeError("these tensors are on CUDA but vse_cuda was built without CUDA kernels (VSE_CUDA=0 or no nvcc)")
    return torch.ops.vse_cuda
