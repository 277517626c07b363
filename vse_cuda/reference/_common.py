"""Helpers every part of the oracle shares: the compute dtype, the input preparation
(upcast, optional normalization), the reduction and the enum-string check."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

REDUCTIONS = ("sum", "mean")


def _check_choice(name: str, value: str, choices: Tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the oracle computes in: float32 for float16/bfloat16, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _prep(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Upcast half types to float32, then optionally L2-normalize rows (F.normalize, eps 1e-12)."""
    x = x.to(compute_dtype(x.dtype))
    if normalize:
        x = F.normalize(x, dim=1)
    return x


def _reduce(total: torch.Tensor, n: int, reduction: str) -> torch.Tensor:
    """``"sum"``: total; ``"mean"``: total / n."""
    _check_choice("reduction", reduction, REDUCTIONS)
    return total / n if reduction == "mean" else total


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products s_i = <a_i, b_i> (length N)."""
    return (a * b).sum(dim=1)
