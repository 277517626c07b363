"""Inputs, label patterns and comparisons shared by the loss tests (test_triplet.py,
test_unified.py, test_quintuplet.py, test_goal.py). Not a test module."""

from __future__ import annotations

import pytest
import torch

#: (rtol, atol relative to the largest expected magnitude) per input dtype: float64 to
#: 1e-10, float32 to 1e-5, half types at their own precision (the loss is rounded to them).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

#: Label patterns: none; random ids; every pair shares its id with at least one other pair
#: (COCO's 5 captions per image); one id for all (no anchor has a negative).
LABEL_KINDS = (None, "random", "pairs", "same")


def random_inputs(n: int, d: int, dtype: torch.dtype = torch.float64, seed: int = 0, count: int = 2):
    """`count` [n, d] standard normal tensors (img, txt, then any further inputs)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(count))


def grid_inputs(n: int, d: int, dtype: torch.dtype = torch.float64, seed: int = 0, count: int = 2):
    """Entries in {-3/4, …, 3/4}: exact in every dtype, and so is every similarity (a multiple
    of 1/16) in any summation order, so mining decisions, exact ties and hinges at exactly 0
    (margins that are multiples of 1/16) are the same for the engine and the oracle."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(-3, 4, (n, d), generator=g).to(dtype) / 4 for _ in range(count))


#: The "cuda" backend of a test's backend list, as in conftest.BACKENDS: marked, and skipped
#: where no GPU exists.
CUDA_BACKEND = pytest.param("cuda", marks=[pytest.mark.cuda,
                                           pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")])


def per_backend(backends, cases, simt_cases):
    """Parameters (backend, *case) of a test grid: every case on each backend, but only
    `simt_cases` on "simt" (the SIMT executor runs each GPU thread as a CPU fiber, so its grid
    is trimmed to keep a test file's run short). A backend may be a pytest.param carrying
    marks (CUDA_BACKEND)."""
    params = []
    for backend in backends:
        name, marks = (backend.values[0], backend.marks) if hasattr(backend, "marks") else (backend, ())
        for case in simt_cases if name == "simt" else cases:
            params.append(pytest.param(name, *case, marks=marks))
    return params


def make_labels(kind: str | None, n: int, seed: int = 0) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, max(1, n // 3), (n,), generator=g)
    if kind == "pairs":  # ids 0,0,1,1,2,2,…, an odd last pair joins the previous id
        return (torch.arange(n) // 2).clamp(max=max(0, n // 2 - 1))
    if kind == "same":
        return torch.zeros(n, dtype=torch.int64)
    raise ValueError(kind)


def chunk_options(n: int) -> list[int | None]:
    """The default plan (one chunk, which divides N), a smaller chunk size that divides N (one
    that keeps the number of chunks small) and one that does not (where N has one)."""
    options: list[int | None] = [None]
    divisor = next((c for c in (32, 1) if n % c == 0 and c < n and (c > 1 or n <= 3)), None)
    if divisor is not None:
        options.append(divisor)
    if n > 2:
        options.append(next(c for c in (48, 5, 3, 2) if n % c != 0 and c < n))
    return options


def loss_and_grads(fn, *inputs: torch.Tensor):
    """fn(*inputs) (e.g. img, txt) and its gradients with respect to every input (fresh leaves)."""
    leaves = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "",
                 scale: float = 1.0, tol: float | None = None) -> None:
    """Same dtype and shape; values within `tol` (default TOL[dtype]), relative to the largest
    of `scale`, 1 and the largest expected magnitude."""
    assert got.dtype == want.dtype, what
    tol = TOL[dtype] if tol is None else tol
    scale = max(1.0, scale, float(want.detach().abs().max()) if want.numel() else 0.0)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")
