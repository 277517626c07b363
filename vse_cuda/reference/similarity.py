"""The similarity matrix ``S = a @ b.T``."""

from __future__ import annotations

import torch

from ._common import _prep


def similarity(a: torch.Tensor, b: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """``S = a @ b.T`` (N x M); with ``normalize`` both are L2-normalized row-wise first.

    Computed in :func:`compute_dtype` and returned in ``a.dtype``.
    """
    out_dtype = a.dtype
    return (_prep(a, normalize) @ _prep(b, normalize).T).to(out_dtype)
