"""Unified loss, spec §4.2."""

from __future__ import annotations

from typing import Optional

import torch

from ._common import REDUCTIONS, _check_choice, _prep, _reduce
from .negatives import negative_mask


def _unified_direction(S: torch.Tensor, valid: torch.Tensor, scale: float,
                       margin: float) -> torch.Tensor:
    """sum_i logsumexp({0} U {scale * (S_ij - S_ii + margin) : valid_ij}) over rows of S."""
    P = S.diagonal()
    z = scale * (S - P[:, None] + margin)
    z = z.masked_fill(~valid, float("-inf"))
    zero = torch.zeros(S.shape[0], 1, dtype=S.dtype, device=S.device)
    return torch.logsumexp(torch.cat([zero, z], dim=1), dim=1).sum()


def unified_loss_from_similarity(S: torch.Tensor, *, scale: float = 20.0, margin: float = 0.2,
                                 labels: Optional[torch.Tensor] = None,
                                 reduction: str = "sum") -> torch.Tensor:
    """Unified pair-similarity loss of a square S (spec §4.2, no 1/gamma prefactor).

    ``L = sum_i log(1 + sum_{valid j} exp(g (S_ij - S_ii + m)))
        + sum_j log(1 + sum_{valid i} exp(g (S_ij - S_jj + m)))``, g = ``scale``.
    Each log is a log-sum-exp that includes the constant 0 term (stable for g = 1000).
    m = 0, g = 1/tau is symmetric InfoNCE; (1/g) L -> hardest triplet as g -> inf.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    n = S.shape[0]
    valid = negative_mask(n, labels, S.device)
    total = (_unified_direction(S, valid, scale, margin)
             + _unified_direction(S.T, valid.T, scale, margin))
    return _reduce(total, n, reduction)


def unified_loss(img: torch.Tensor, txt: torch.Tensor, *, scale: float = 20.0,
                 margin: float = 0.2, labels: Optional[torch.Tensor] = None,
                 normalize: bool = False, reduction: str = "sum") -> torch.Tensor:
    """Unified loss on ``S = img @ txt.T``; see :func:`unified_loss_from_similarity`.

    Returns a 0-dim tensor in ``img.dtype``.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    out_dtype = img.dtype
    S = _prep(img, normalize) @ _prep(txt, normalize).T
    loss = unified_loss_from_similarity(S, scale=scale, margin=margin, labels=labels,
                                        reduction=reduction)
    return loss.to(out_dtype)
