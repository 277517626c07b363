"""vse_cuda: fused, memory-bounded similarity, top-k mining and retrieval losses for PyTorch.

Backends: CPU kernels always, CUDA kernels when built with nvcc (see :func:`backends`).
The oracle every kernel is tested against is :mod:`vse_cuda.reference`.
"""

from ._lib import backends, use_backend
from .similarity import similarity
from .topk import topk_similar

__all__ = ["backends", "similarity", "topk_similar", "use_backend"]
__version__ = "0.1.0"
