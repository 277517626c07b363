"""Chunk sizes from a memory budget (DESIGN §3): the engine never holds more than one
row_chunk × col_chunk tile of the similarity matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Bytes of similarity tile the engine may hold at once, unless a call overrides it.
DEFAULT_MEMORY_BUDGET = 256 * 2**20
#: Rows per GEMM tile by default: tall enough for GEMM efficiency, short enough for progress.
DEFAULT_ROW_CHUNK = 1024


@dataclass(frozen=True)
class Chunks:
    rows: int
    cols: int


def score_bytes(dtype: torch.dtype) -> int:
    """Bytes of one similarity as the engine stores it (half types accumulate in float32)."""
    return 8 if dtype == torch.float64 else 4


def plan_chunks(n: int, m: int, dtype: torch.dtype, row_chunk: int | None = None,
                budget: int = DEFAULT_MEMORY_BUDGET) -> Chunks:
    """Rows per tile (``row_chunk`` or a default) and the widest column tile that keeps one
    tile within ``budget`` bytes."""
    rows = max(1, min(n, row_chunk or DEFAULT_ROW_CHUNK))
    cols = max(1, min(m, budget // (rows * score_bytes(dtype))))
    return Chunks(rows, cols)
