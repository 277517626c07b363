"""Retrieval: the top-k keys of every query by inner product."""

from __future__ import annotations

from typing import Optional

import torch

from ._common import _prep
from .negatives import rank_candidates


def topk_similar(queries: torch.Tensor, keys: torch.Tensor, k: int, *, normalize: bool = False,
                 query_labels: Optional[torch.Tensor] = None,
                 key_labels: Optional[torch.Tensor] = None):
    """Top-k keys for every query by inner product ``S = queries @ keys.T``.

    Key j is excluded for query i when both label vectors are given and
    ``key_labels[j] == query_labels[i]`` (e.g. an image's own captions). There is no implicit
    diagonal exclusion (queries and keys are different sets).
    Order: value descending, ties by lowest key index, NaN above every number.
    Returns ``(values [N, k] in queries.dtype, indices [N, k] int64)``. The ranking is done on
    the compute-dtype (float32 for half inputs) scores. If a query has fewer than k eligible
    keys (k > M, or label exclusion), the missing slots hold value ``-inf`` and index ``-1``.
    Giving exactly one of ``query_labels``/``key_labels`` raises ValueError.
    """
    if (query_labels is None) != (key_labels is None):
        raise ValueError("query_labels and key_labels must be given together")
    out_dtype = queries.dtype
    S = _prep(queries, normalize) @ _prep(keys, normalize).T
    n, m = S.shape
    if query_labels is None:
        valid = torch.ones(n, m, dtype=torch.bool, device=S.device)
    else:
        valid = query_labels.to(S.device)[:, None] != key_labels.to(S.device)[None, :]
    order, count = rank_candidates(S, valid)
    values = torch.full((n, k), float("-inf"), dtype=S.dtype, device=S.device)
    indices = torch.full((n, k), -1, dtype=torch.int64, device=S.device)
    kk = min(int(k), m)
    slot_valid = torch.arange(kk, device=S.device)[None, :] < count[:, None]
    idx = order[:, :kk]
    values[:, :kk] = torch.where(slot_valid, S.gather(1, idx), values[:, :kk])
    indices[:, :kk] = torch.where(slot_valid, idx, indices[:, :kk])
    return values.to(out_dtype), indices
