"""The similarity matrix S = a·bᵀ (inner product; cosine when the encoders L2-normalize).

The function lives in :mod:`vse_cuda.ops.similarity`; this module keeps its public name.
"""

from .ops.similarity import similarity

__all__ = ["similarity"]
