"""Triplet loss (VSE0 / VSE++ / top-k), spec §2."""

from __future__ import annotations

from typing import Optional

import torch

from ._common import REDUCTIONS, _check_choice, _prep, _reduce
from .negatives import hardest_negative, negative_mask, topk_negatives

MINING_MODES = ("all", "hardest", "topk")


def _triplet_direction(S: torch.Tensor, valid: torch.Tensor, margin: float, mining: str,
                       k: int) -> torch.Tensor:
    """Sum over anchors (rows of S, positive on the diagonal) of the mined hinge terms."""
    P = S.diagonal()
    if mining == "all":
        hinge = torch.relu(margin + S - P[:, None])
        return torch.where(valid, hinge, torch.zeros_like(hinge)).sum()
    if mining == "hardest":
        u, _, has = hardest_negative(S, valid)
        hinge = torch.relu(margin + u - P)
        return torch.where(has, hinge, torch.zeros_like(hinge)).sum()
    # topk: mean of the hinges of the (up to) k hardest valid negatives
    vals, _, slot_valid = topk_negatives(S, valid, k)
    hinge = torch.relu(margin + vals - P[:, None])
    hinge = torch.where(slot_valid, hinge, torch.zeros_like(hinge))
    count = slot_valid.sum(dim=1).clamp_min(1).to(S.dtype)
    return (hinge.sum(dim=1) / count).sum()


def triplet_loss_from_similarity(S: torch.Tensor, *, margin: float = 0.2, mining: str = "hardest",
                                 k: int = 1, labels: Optional[torch.Tensor] = None,
                                 reduction: str = "sum") -> torch.Tensor:
    """Triplet loss of a square similarity matrix S (no casting; S's dtype is the compute dtype).

    With ``h_ij = [m + S_ij - S_ii]_+`` (i2t, rows) and ``g_ij = [m + S_ij - S_jj]_+`` (t2i,
    columns) and V the valid-negative mask (:func:`negative_mask`):

    * ``"all"`` (VSE0, spec L_SH): ``L = sum_{V_ij} h_ij + sum_{V_ij} g_ij``.
    * ``"hardest"`` (VSE++, spec L_MH): ``L = sum_i [m + S_{i,c(i)} - S_ii]_+
      + sum_j [m + S_{r(j),j} - S_jj]_+``, c(i)/r(j) the hardest valid negative of row i /
      column j (lowest index on ties).
    * ``"topk"``: per anchor the mean of the hinges of its k hardest valid negatives (over
      ``min(k, #valid)`` of them); both directions summed. k = 1 equals ``"hardest"``.

    ``k`` is ignored unless ``mining == "topk"``. Anchors without a valid negative add 0.
    The hinge is ``relu``, whose derivative at exactly 0 is 0 (indicator ``1[. > 0]``).
    """
    _check_choice("mining", mining, MINING_MODES)
    _check_choice("reduction", reduction, REDUCTIONS)
    n = S.shape[0]
    valid = negative_mask(n, labels, S.device)
    total = (_triplet_direction(S, valid, margin, mining, k)
             + _triplet_direction(S.T, valid.T, margin, mining, k))
    return _reduce(total, n, reduction)


def triplet_loss(img: torch.Tensor, txt: torch.Tensor, *, margin: float = 0.2,
                 mining: str = "hardest", k: int = 1, labels: Optional[torch.Tensor] = None,
                 normalize: bool = False, reduction: str = "sum") -> torch.Tensor:
    """VSE triplet loss on ``S = img @ txt.T``; see :func:`triplet_loss_from_similarity`.

    Returns a 0-dim tensor in ``img.dtype``.
    """
    _check_choice("mining", mining, MINING_MODES)
    _check_choice("reduction", reduction, REDUCTIONS)
    out_dtype = img.dtype
    S = _prep(img, normalize) @ _prep(txt, normalize).T
    loss = triplet_loss_from_similarity(S, margin=margin, mining=mining, k=k, labels=labels,
                                        reduction=reduction)
    return loss.to(out_dtype)
