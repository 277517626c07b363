"""Reference oracle for vse_cuda: plain, materialized PyTorch written from spec/losses.md.

This package is the ground truth the fused CPU/CUDA kernels are tested against and the
"eager" baseline in the benchmarks. The product path never calls it. It favours clarity over
speed: every loss materializes the full N x N similarity matrix S and the masks it needs.
It imports only torch (and typing) so that tests can load it standalone from its directory.

Conventions (DESIGN.md §5, §6; spec/losses.md §1)
------------------------------------------------
* ``S = img @ txt.T``. Rows are images (i2t anchors), columns are captions (t2i anchors).
  Inputs are N x D and paired: row i of ``img`` matches row i of ``txt``, so the positives
  are the diagonal, ``P_i = S_ii``.
* ``normalize=True`` applies ``x / max(||x||_2, 1e-12)`` row-wise (``F.normalize``) to every
  embedding input first; gradients go through it by autograd.
* dtype: float16/bfloat16 inputs are upcast to float32 before anything is computed; the loss
  (or S / top-k values) is cast back to the input dtype. float32/float64 compute in their own
  dtype. Gradients come back in the input dtype (autograd takes them through the casts).
* ``labels`` (int64, [N]) masks false negatives: j is a valid negative of anchor i iff
  ``j != i`` and (without labels, nothing more) ``labels[j] != labels[i]``. The mask is
  symmetric, so it is the same for the i2t (rows) and t2i (columns) directions.
* Ties in every argmax / top-k: the lowest index wins. NaN ranks above every number (as in a
  descending ``torch.sort``); among several NaN the lowest index wins. A NaN in the inputs
  therefore yields a NaN loss, never an out-of-range index.
* ``reduction``: ``"sum"`` (default, the official codes' scale) or ``"mean"`` (sum / N, N the
  number of pairs in the batch, for every loss and every mining mode).
* An anchor with no valid negative (N = 1, or every other item shares its label) contributes
  0 loss and 0 gradient to the in-batch terms.
* Validation is the public wrappers' job; the oracle only raises ``ValueError`` for unknown
  enum strings (``mining``, ``reduction``, ``triplet_weight``, ``pair_weight``).

One module per op, named as everywhere else: :mod:`.similarity`, :mod:`.topk`,
:mod:`.triplet`, :mod:`.unified`, :mod:`.quintuplet`, :mod:`.goal`, :mod:`.siglip`; the masks and negative
mining they share in :mod:`.negatives`; open_clip's ClipLoss, which vse_cuda.contrib.open_clip
replaces, in :mod:`.clip`. Every name is re-exported here.

Building blocks exported for other tests: :func:`negative_mask`, :func:`hardest_negative`,
:func:`rank_candidates`, :func:`topk_negatives`, :func:`triplet_loss_from_similarity`,
:func:`unified_loss_from_similarity`, :func:`quintuplet_loss_from_scores`,
:func:`goal_weights`, :func:`goal_value_and_grad`, :func:`goal_loss_from_similarity`.
"""

from ._common import REDUCTIONS, compute_dtype
from .clip import clip_loss, siglip_rank_loss
from .goal import (GOAL_MS_NEG_OFFSET, GOAL_MS_POS_OFFSET, PAIR_WEIGHTS, TRIPLET_WEIGHTS, goal_loss,
                   goal_loss_from_similarity, goal_value_and_grad, goal_weights)
from .negatives import hardest_negative, negative_mask, rank_candidates, topk_negatives
from .quintuplet import quintuplet_loss, quintuplet_loss_from_scores
from .siglip import siglip_loss, siglip_loss_from_similarity
from .similarity import similarity
from .topk import topk_similar
from .triplet import MINING_MODES, triplet_loss, triplet_loss_from_similarity
from .unified import unified_loss, unified_loss_from_similarity

__all__ = [
    "MINING_MODES",
    "REDUCTIONS",
    "TRIPLET_WEIGHTS",
    "PAIR_WEIGHTS",
    "compute_dtype",
    "negative_mask",
    "hardest_negative",
    "rank_candidates",
    "topk_negatives",
    "similarity",
    "topk_similar",
    "triplet_loss_from_similarity",
    "triplet_loss",
    "unified_loss_from_similarity",
    "unified_loss",
    "clip_loss",
    "siglip_rank_loss",
    "siglip_loss_from_similarity",
    "siglip_loss",
    "quintuplet_loss_from_scores",
    "quintuplet_loss",
    "goal_weights",
    "goal_value_and_grad",
    "goal_loss_from_similarity",
    "goal_loss",
]
