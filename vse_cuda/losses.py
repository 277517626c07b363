"""In-batch image–text retrieval losses over the chunked engine (DESIGN §3): the triplet loss
(VSE0 / VSE++ / top-k mining), the unified loss, the AOQ quintuplet loss, GOAL and SigLIP's
sigmoid loss, as functions and ``nn.Module``s.

The N×N similarity matrix is never materialized: S = img·txtᵀ is computed in row chunks
whose size comes from a memory budget, each chunk reduced to per-row and per-column state.
Gradients are exact and deterministic (no floating-point atomics); the oracle they are
tested against is :mod:`vse_cuda.reference`.

Each loss lives in its own module, :mod:`vse_cuda.ops.triplet`, :mod:`~vse_cuda.ops.unified`,
:mod:`~vse_cuda.ops.quintuplet`, :mod:`~vse_cuda.ops.goal` and :mod:`~vse_cuda.ops.siglip`; this module gathers their
public names.
"""

from .ops._engine import REDUCTIONS
from .ops.goal import PAIR_WEIGHTS, TRIPLET_WEIGHTS, GoalLoss, goal_loss
from .ops.quintuplet import QuintupletLoss, quintuplet_loss
from .ops.siglip import SigLipLoss, siglip_loss
from .ops.triplet import MINING_MODES, TripletLoss, triplet_loss
from .ops.unified import UnifiedLoss, unified_loss

__all__ = ["GoalLoss", "QuintupletLoss", "SigLipLoss", "TripletLoss", "UnifiedLoss", "goal_loss", "quintuplet_loss",
           "siglip_loss", "triplet_loss", "unified_loss"]
