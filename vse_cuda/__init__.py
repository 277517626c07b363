"""vse_cuda: fused, memory-bounded similarity, top-k mining and retrieval losses for PyTorch.

Backends: CPU kernels always, CUDA kernels when built with nvcc (see :func:`backends`).
The oracle every kernel is tested against is :mod:`vse_cuda.reference`. Each op (its
function, module, fake kernels and autograd) lives in :mod:`vse_cuda.ops`, one module per op
named as in csrc.
"""

from . import distributed
from ._lib import backends, use_backend
from .losses import (GoalLoss, QuintupletLoss, SigLipLoss, TripletLoss, UnifiedLoss, goal_loss, quintuplet_loss,
                     siglip_loss, triplet_loss, unified_loss)
from .similarity import similarity
from .topk import topk_similar

__all__ = [
    "GoalLoss",
    "QuintupletLoss",
    "SigLipLoss",
    "TripletLoss",
    "UnifiedLoss",
    "backends",
    "distributed",
    "goal_loss",
    "mining",
    "quintuplet_loss",
    "siglip_loss",
    "similarity",
    "topk_similar",
    "triplet_loss",
    "unified_loss",
    "use_backend",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `vse_cuda.mining` is loaded on first use: `import vse_cuda` stays as fast as before, and
    # `python -m vse_cuda.mining` does not find the module already imported by the package
    # (runpy warns when it does).
    if name == "mining":
        import importlib

        return importlib.import_module(".mining", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
