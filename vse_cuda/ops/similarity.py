"""The similarity matrix S = a·bᵀ (inner product; cosine when the encoders L2-normalize).

No C++ of its own: one GEMM through torch (MKL / cuBLAS), the N×M result the losses and
topk_similar avoid; tested by python_tests/test_similarity.py; no benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import check_bool, check_compatible, check_embeddings

__all__ = ["similarity"]


def similarity(a: torch.Tensor, b: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """S[i, j] = ⟨a_i, b_j⟩, or ⟨a_i/‖a_i‖, b_j/‖b_j‖⟩ with ``normalize=True``.

    One GEMM on the inputs' device (MKL / cuBLAS); differentiable. Half inputs give a half
    result accumulated in float32 by the GEMM. This materializes N×M: the losses and
    :func:`vse_cuda.topk_similar` never call it.
    """
    check_embeddings("a", a)
    check_embeddings("b", b)
    check_compatible(("a", "b"), (a, b))
    check_bool("normalize", normalize)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return a @ b.T
