"""Streaming top-k mining: the k most similar keys of every query, without N×M memory.

Its pieces, by name: csrc/common/topk.h (the candidate order), csrc/common/topk_args.h (the
C++ argument checks), csrc/cpu/topk.{h,cpp}, csrc/cuda/topk.{cuh,cu}, the schema in
csrc/ops.cpp; tested by python_tests/test_topk.py; benchmarked by benchmarks/bench_topk.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _lib
from .._chunking import plan_chunks
from .._validation import check_bool, check_compatible, check_embeddings, check_int, check_labels
from ._engine import register_fake

__all__ = ["topk_similar"]


def topk_similar(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    normalize: bool = False,
    query_labels: torch.Tensor | None = None,
    key_labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest S[i, j] = ⟨queries_i, keys_j⟩ of every query row, best first.

    S is computed tile by tile (``chunk_size`` query rows × as many keys as fit the memory
    budget), each tile reduced by a fused top-k kernel into running per-row lists, so the
    extra memory is O(chunk·M + N·k) whatever N and M are.

    Order: larger similarity first; ties go to the lower key index; NaN ranks above every
    number (as in ``torch.sort(descending=True)``), so NaN in the data shows up instead of
    being silently skipped. Indices are always in [0, M).

    Args:
        queries: [N, D] float16/bfloat16/float32/float64.
        keys: [M, D], same dtype and device.
        k: number of results per query, 1 <= k <= M (minus the keys a query's label excludes).
        normalize: L2-normalize both sides first (cosine similarity).
        query_labels, key_labels: int64 [N] and [M], given together; key j is never returned
            for query i when key_labels[j] == query_labels[i] (e.g. an image's own captions).
        chunk_size: query rows per tile (default 1024).
        progress: show a tqdm progress bar over query chunks.

    Returns:
        (values [N, k] in the input dtype, computed in float32 for half types;
        indices [N, k] int64). Not differentiable: this is a mining op.
    """
    check_embeddings("queries", queries)
    check_embeddings("keys", keys)
    check_compatible(("queries", "keys"), (queries, keys))
    n, m = queries.size(0), keys.size(0)
    if m == 0:  # k >= 1 results cannot come from no keys (the k check below would let k=1 by)
        raise ValueError(f"keys must hold at least one row to take k >= 1 from, got shape {tuple(keys.shape)}")
    if (query_labels is None) != (key_labels is None):
        raise ValueError("query_labels and key_labels must be given together (or neither)")
    query_labels = check_labels("query_labels", query_labels, n, queries.device)
    key_labels = check_labels("key_labels", key_labels, m, keys.device)
    fewest, query = _fewest_candidates(n, m, query_labels, key_labels)
    if fewest == 0:  # the kernels would pad that row with index -1, outside [0, M)
        raise ValueError(f"query_labels and key_labels leave query {query} (label "
                         f"{int(query_labels[query])}) no key to return: every key has its label")
    check_int("k", k, 1, fewest)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    check_bool("normalize", normalize)
    check_bool("progress", progress)

    if normalize:
        queries, keys = F.normalize(queries, dim=1), F.normalize(keys, dim=1)
    queries, keys = queries.detach(), keys.detach()
    chunks = plan_chunks(n, m, queries.dtype, chunk_size)
    no_labels = queries.new_empty(0, dtype=torch.int64)
    op = _lib.ops(queries, keys, names=("queries", "keys")).topk_similar
    values, indices = [], []
    starts = range(0, n, chunks.rows)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="topk_similar", unit="chunk")
    for start in starts:
        rows = slice(start, start + chunks.rows)
        v, i = op(queries[rows], keys, k,
                  no_labels if query_labels is None else query_labels[rows],
                  no_labels if key_labels is None else key_labels,
                  chunks.rows, chunks.cols)
        values.append(v)
        indices.append(i)
    if not values:  # N == 0
        return queries.new_empty(0, k), queries.new_empty(0, k, dtype=torch.int64)
    if len(values) == 1:
        return values[0], indices[0]
    return torch.cat(values), torch.cat(indices)


def _fewest_candidates(n: int, m: int, query_labels: torch.Tensor | None,
                       key_labels: torch.Tensor | None) -> tuple[int, int]:
    """The smallest number of keys any query may return (M minus its same-label keys), and
    the first query with that few. Meta tensors (shapes only, as torch.compile traces them)
    hold no labels to count: the kernels' own checks run on real data."""
    if query_labels is None or n == 0 or query_labels.device.type == "meta" or key_labels.device.type == "meta":
        return m, 0
    sorted_keys = torch.sort(key_labels).values
    same = torch.searchsorted(sorted_keys, query_labels, right=True) - torch.searchsorted(sorted_keys, query_labels)
    most = int(same.max())
    return m - most, int(torch.nonzero(same == most)[0])


def _fake(queries, keys, k, query_labels, key_labels, row_chunk, col_chunk):
    n = queries.size(0)
    return queries.new_empty(n, k), queries.new_empty(n, k, dtype=torch.int64)


register_fake("topk_similar", _fake)
