"""Streaming top-k mining: the k most similar keys of every query, without N×M memory.

The op lives in :mod:`vse_cuda.ops.topk`; this module keeps its public name.
"""

from .ops.topk import topk_similar

__all__ = ["topk_similar"]
