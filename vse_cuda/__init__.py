"""vse_cuda: fused, memory-bounded similarity, top-k mining and retrieval losses for PyTorch.

Backends: CPU kernels always, CUDA kernels when built with nvcc (see :func:`backends`).
The oracle every kernel is tested against is :mod:`vse_cuda.reference`.
"""

from . import distributed
from ._lib import backends, use_backend
from .losses import (GoalLoss, QuintupletLoss, TripletLoss, UnifiedLoss, goal_loss, quintuplet_loss, triplet_loss,
                     unified_loss)
from .similarity import similarity
from .topk import topk_similar

__all__ = [
    "GoalLoss",
    "QuintupletLoss",
    "TripletLoss",
    "UnifiedLoss",
    "backends",
    "distributed",
    "goal_loss",
    "quintuplet_loss",
    "similarity",
    "topk_similar",
    "triplet_loss",
    "unified_loss",
    "use_backend",
]
__version__ = "0.1.0"
