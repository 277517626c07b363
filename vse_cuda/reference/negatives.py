"""Valid-negative masks and in-batch negative mining: the hardest, all ranked, the top k."""

from __future__ import annotations

from typing import Optional

import torch


def negative_mask(n: int, labels: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Bool N x N mask of valid negatives.

    ``mask[i, j] = (j != i) and (labels is None or labels[i] != labels[j])``.
    Symmetric, so it serves rows (i2t anchors) and columns (t2i anchors) alike.
    """
    if device is None and labels is not None:
        device = labels.device
    mask = ~torch.eye(n, dtype=torch.bool, device=device)
    if labels is not None:
        labels = labels.to(device)
        mask &= labels[:, None] != labels[None, :]
    return mask


def hardest_negative(S: torch.Tensor, valid: torch.Tensor):
    """Row-wise hardest valid entry: ``c(i) = argmax_{j : valid[i, j]} S[i, j]``.

    Ties go to the lowest index; NaN ranks above every number (the first NaN wins).
    Returns ``(values, indices, has)``: ``values[i] = S[i, c(i)]`` (differentiable, gathered
    from S), ``indices`` int64, ``has[i]`` = row i has at least one valid entry. Rows with no
    valid entry get index 0 and ``has = False``; callers must mask them out.
    For the column direction (t2i) call it on ``S.T, valid.T``.
    """
    n, m = S.shape
    with torch.no_grad():
        has = valid.any(dim=1)
        filled = S.detach().masked_fill(~valid, float("-inf"))
        best = filled.amax(dim=1, keepdim=True)  # NaN propagates: a NaN row maximum is NaN
        hit = valid & ((filled == best) | (torch.isnan(filled) & torch.isnan(best)))
        cols = torch.arange(m, device=S.device).expand(n, m)
        idx = torch.where(hit, cols, torch.full_like(cols, m)).amin(dim=1)
        idx = torch.where(has, idx, torch.zeros_like(idx))
    values = S.gather(1, idx[:, None]).squeeze(1)
    return values, idx, has


def rank_candidates(S: torch.Tensor, valid: torch.Tensor):
    """Per row, all column indices ordered: valid before invalid; among valid ones by value
    descending (NaN first), ties by lowest index.

    Returns ``(order [N, M] int64, count [N] int64)`` where ``count[i]`` is the number of valid
    entries of row i, i.e. ``order[i, :count[i]]`` are the valid candidates in rank order.
    Two stable sorts: by value (descending), then by validity (valid first).
    """
    with torch.no_grad():
        order = torch.sort(S.detach(), dim=1, descending=True, stable=True).indices
        v = valid.gather(1, order).to(torch.int8)
        order = order.gather(1, torch.sort(v, dim=1, descending=True, stable=True).indices)
        count = valid.sum(dim=1)
    return order, count


def topk_negatives(S: torch.Tensor, valid: torch.Tensor, k: int):
    """The k highest valid entries of every row (see :func:`rank_candidates` for the order).

    Returns ``(values [N, kk], indices [N, kk], slot_valid [N, kk])`` with ``kk = min(k, M)``;
    ``values`` are gathered from S (differentiable); ``slot_valid[i, s] = s < count[i]``.
    Slots past a row's count hold arbitrary (invalid) columns and must be masked by the caller.
    """
    order, count = rank_candidates(S, valid)
    kk = min(int(k), S.shape[1])
    idx = order[:, :kk]
    slot_valid = torch.arange(kk, device=S.device)[None, :] < count[:, None]
    return S.gather(1, idx), idx, slot_valid
