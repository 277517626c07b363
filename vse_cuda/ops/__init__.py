"""One module per op, named as the op is in csrc (csrc/common/X.h, csrc/cpu/X.cpp,
csrc/cuda/X.cu) and in the tests (python_tests/test_X.py). Each holds its public function,
its ``nn.Module`` for the losses, its fake kernels and its autograd registration:

* :mod:`.similarity`: ``similarity`` (one GEMM, no kernel of its own)
* :mod:`.topk`: ``topk_similar``
* :mod:`.triplet`: ``triplet_loss``, ``TripletLoss``
* :mod:`.unified`: ``unified_loss``, ``UnifiedLoss``
* :mod:`.quintuplet`: ``quintuplet_loss``, ``QuintupletLoss``
* :mod:`.goal`: ``goal_loss``, ``GoalLoss``
* :mod:`.siglip`: ``siglip_loss``, ``SigLipLoss``

:mod:`._engine` is what the losses share: the common checks, normalization, the gather over
the process group, the chunk plan, the reduction and the registration of the ops in both
namespaces. The public names are re-exported by :mod:`vse_cuda`.
"""
