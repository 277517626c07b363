"""Unified loss, spec §4.2."""

from __future__ import annotations

from typing import Optional, Union

import torch

from ._common import REDUCTIONS, _check_choice, _prep, _reduce
from .negatives import negative_mask


Scale = Union[float, torch.Tensor]


def _unified_direction(S: torch.Tensor, valid: torch.Tensor, scale: Scale,
                       margin: float) -> torch.Tensor:
    """sum_i logsumexp({0} U {scale * (S_ij - S_ii + margin) : valid_ij}) over rows of S."""
    P = S.diagonal()
    z = scale * (S - P[:, None] + margin)
    z = z.masked_fill(~valid, float("-inf"))
    zero = torch.zeros(S.shape[0], 1, dtype=S.dtype, device=S.device)
    return torch.logsumexp(torch.cat([zero, z], dim=1), dim=1).sum()


def _label_positive_direction(S: torch.Tensor, same: torch.Tensor, scale: Scale,
                              margin: float) -> torch.Tensor:
    """sum_i mean_{p in P(i)} logsumexp({0} U {scale (S_ij - S_ip + margin) : j not in P(i)}).

    ``same[i, j]`` = labels_i == labels_j (so i is in P(i)). Materializes N x N x N: the
    oracle is for small N only.
    """
    z = scale * (S[:, None, :] - S[:, :, None] + margin)  # z[i, p, j]
    z = z.masked_fill(same[:, None, :], float("-inf"))
    zero = torch.zeros(*z.shape[:2], 1, dtype=S.dtype, device=S.device)
    per_pair = torch.logsumexp(torch.cat([zero, z], dim=2), dim=2)  # [i, p]
    per_pair = per_pair.masked_fill(~same, 0.0)
    return (per_pair.sum(dim=1) / same.sum(dim=1).to(S.dtype)).sum()


def unified_loss_from_similarity(S: torch.Tensor, *, scale: Scale = 20.0, margin: float = 0.2,
                                 labels: Optional[torch.Tensor] = None,
                                 reduction: str = "sum",
                                 label_positives: bool = False) -> torch.Tensor:
    """Unified pair-similarity loss of a square S (spec §4.2, no 1/gamma prefactor).

    ``L = sum_i log(1 + sum_{valid j} exp(g (S_ij - S_ii + m)))
        + sum_j log(1 + sum_{valid i} exp(g (S_ij - S_jj + m)))``, g = ``scale``.
    Each log is a log-sum-exp that includes the constant 0 term (stable for g = 1000).
    m = 0, g = 1/tau is symmetric InfoNCE; (1/g) L -> hardest triplet as g -> inf.

    ``scale`` may be a 0-dim tensor (a learnable temperature): autograd then gives
    ``dL/dg = sum_i sum_j p_ij (S_ij - S_ii + m)`` over row and column anchors, p_ij the
    softmax weight of term j in anchor i's log-sum-exp (the 0 term included, with weight
    p_i0 and value 0). CLIP's ``logit_scale`` is a log: pass ``g = logit_scale.exp()``.

    ``label_positives=True`` (needs ``labels``): every j with labels_j = labels_i is a
    positive of anchor i instead of a masked pair. With P(i) = {j : labels_j = labels_i}
    (i included), anchor i's term is
    ``mean_{p in P(i)} log(1 + sum_{j not in P(i)} exp(g (S_ij - S_ip + m)))``, the same
    for column anchors. With unique labels it equals the default loss. Like SupCon's
    L_out (mean over positives outside the log), but each positive competes only with
    the negatives, not with the other positives, and the 0 term is the positive itself.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    n = S.shape[0]
    if label_positives:
        if labels is None:
            raise ValueError("label_positives=True needs labels")
        labels = labels.to(S.device)
        same = labels[:, None] == labels[None, :]
        total = (_label_positive_direction(S, same, scale, margin)
                 + _label_positive_direction(S.T, same.T, scale, margin))
        return _reduce(total, n, reduction)
    valid = negative_mask(n, labels, S.device)
    total = (_unified_direction(S, valid, scale, margin)
             + _unified_direction(S.T, valid.T, scale, margin))
    return _reduce(total, n, reduction)


def unified_loss(img: torch.Tensor, txt: torch.Tensor, *, scale: Scale = 20.0,
                 margin: float = 0.2, labels: Optional[torch.Tensor] = None,
                 normalize: bool = False, reduction: str = "sum",
                 label_positives: bool = False) -> torch.Tensor:
    """Unified loss on ``S = img @ txt.T``; see :func:`unified_loss_from_similarity`.

    Returns a 0-dim tensor in ``img.dtype``.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    out_dtype = img.dtype
    S = _prep(img, normalize) @ _prep(txt, normalize).T
    loss = unified_loss_from_similarity(S, scale=scale, margin=margin, labels=labels,
                                        reduction=reduction, label_positives=label_positives)
    return loss.to(out_dtype)
