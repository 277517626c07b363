"""The triplet (hinge) loss: VSE0 (``mining="all"``), VSE++ (``"hardest"``) and top-k mining.

Its pieces, by name: csrc/common/triplet.h (the mining and hinge math), csrc/common/triplet_op.h
(triplet_forward / triplet_backward on the engine), csrc/cpu/triplet.cpp, csrc/cuda/triplet.cu,
the schemas in csrc/ops.cpp; tested by python_tests/test_triplet.py; benchmarked by
benchmarks/bench_losses.py (variants triplet_hardest, triplet_all, triplet_topk10).
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_choice, check_finite, check_int, check_labels
from . import _engine

MINING_MODES = ("hardest", "all", "topk")

__all__ = ["MINING_MODES", "TripletLoss", "triplet_loss"]


def _check_options(margin, mining, k, normalize, reduction, group, chunk_size):
    """triplet_loss's keywords, checked (the function per call, TripletLoss at construction):
    (margin, mining, k, normalize, reduction, group, chunk_size)."""
    margin = check_finite("margin", margin)
    mining = check_choice("mining", mining, MINING_MODES)
    check_int("k", k, 1)
    normalize, reduction, group, chunk_size = _engine.check_engine_options(normalize, reduction, group, chunk_size)
    return margin, mining, k, normalize, reduction, group, chunk_size


def triplet_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    *,
    margin: float = 0.2,
    mining: str = "hardest",
    k: int = 1,
    labels: torch.Tensor | None = None,
    normalize: bool = False,
    reduction: str = "sum",
    group=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Triplet (hinge) loss of the paired batch ``(img[i], txt[i])`` on S = img·txtᵀ (spec §2).

    With ``h_ij = [m + S_ij − S_ii]_+`` (image anchors, rows) and ``g_ij = [m + S_ij − S_jj]_+``
    (caption anchors, columns), over the valid negatives j ≠ i (and, with ``labels``,
    ``labels[j] != labels[i]``):

    * ``"all"`` (VSE0):     ``L = Σ_i Σ_j h_ij + Σ_j Σ_i g_ij``
    * ``"hardest"`` (VSE++): ``L = Σ_i h_{i,c(i)} + Σ_j g_{r(j),j}``, c(i) / r(j) the hardest
      valid negative of row i / column j (the lowest index on ties)
    * ``"topk"``:           per anchor the mean of the hinges of its k hardest valid
      negatives (fewer if fewer exist); ``k=1`` equals ``"hardest"``.

    An anchor without a valid negative contributes 0. The hinge's gradient at exactly 0 is 0.

    Args:
        img, txt: [N, D] float16/bfloat16/float32/float64 embeddings, same dtype and device.
            Half types are computed in float32; the loss and the gradients come back in the
            input dtype.
        margin: m, a finite number.
        mining: "hardest" (default), "all" or "topk".
        k: negatives per anchor for ``mining="topk"`` (an int >= 1; ignored otherwise).
        labels: optional int64 [N] image ids; pairs with the anchor's label are never
            negatives (false-negative masking, e.g. two captions of one image).
        normalize: L2-normalize img and txt first (``F.normalize``; gradients go through it).
        reduction: "sum" (the official codes' scale) or "mean" (sum / N).
        group: a ``torch.distributed`` process group: negatives come from every rank of it,
            anchors stay local (see :mod:`vse_cuda.distributed`); the sum of the ranks' losses
            is the loss of the concatenated batch, gradients included. None: this process only.
        chunk_size: rows of S per chunk (default: from the memory budget).

    Returns:
        0-dim tensor in ``img.dtype``, differentiable with respect to img and txt.
    """
    n = _engine.check_pair(img, txt, group=group)
    margin, mining, k, normalize, reduction, group, chunk_size = _check_options(
        margin, mining, k, normalize, reduction, group, chunk_size)
    labels = check_labels("labels", labels, n, img.device)
    batch = _engine.gather((img, txt), labels, group, normalize, chunk_size)
    # The op lists min(k, N) negatives per anchor for "topk" and ignores k otherwise.
    total = batch.ops.triplet_forward(*batch.embeddings, batch.labels, margin, mining, k, *batch.tiles)[0]
    return batch.reduce(total, reduction)


class TripletLoss(nn.Module):
    """:func:`triplet_loss` as a module: the keywords are fixed at construction (and checked
    there), ``forward(img, txt, labels=None)`` takes the batch."""

    def __init__(self, *, margin: float = 0.2, mining: str = "hardest", k: int = 1, normalize: bool = False,
                 reduction: str = "sum", group=None, chunk_size: int | None = None):
        super().__init__()
        (self.margin, self.mining, self.k, self.normalize, self.reduction, self.group,
         self.chunk_size) = _check_options(margin, mining, k, normalize, reduction, group, chunk_size)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return triplet_loss(img, txt, margin=self.margin, mining=self.mining, k=self.k, labels=labels,
                            normalize=self.normalize, reduction=self.reduction, group=self.group,
                            chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.mining == "topk" else ""
        return (f"margin={self.margin}, mining={self.mining!r}{k}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}")


# ------------------------------------------------------------------ fake kernels and autograd

def _forward_fake(img, txt, labels, margin, mining, k, anchor_begin, anchor_end, row_chunk, col_chunk):
    n, acc = img.size(0), _engine.acc_dtype(img.dtype)
    width = 2 if mining == "all" else 1 if mining == "hardest" else min(k, max(n, 1))
    index_width = 0 if mining == "all" else width
    return (img.new_empty((), dtype=acc), img.new_empty(n, width, dtype=acc), img.new_empty(n, width, dtype=acc),
            img.new_empty(n, index_width, dtype=torch.int64), img.new_empty(n, index_width, dtype=torch.int64))


def _backward_fake(grad, img, txt, labels, margin, mining, row_saved, col_saved, row_index, col_index, anchor_begin,
                   anchor_end, row_chunk, col_chunk):
    return img.new_empty(img.shape), txt.new_empty(txt.shape)


def _setup_context(ctx, inputs, output):
    img, txt, labels, margin, mining, _k, *anchors_and_chunks = inputs
    _, row_saved, col_saved, row_index, col_index = output
    ctx.mark_non_differentiable(row_saved, col_saved, row_index, col_index)
    ctx.save_for_backward(img, txt, labels, row_saved, col_saved, row_index, col_index)
    ctx.args = (margin, mining, *anchors_and_chunks)


def _backward(ops, ctx, grad):
    img, txt, labels, row_saved, col_saved, row_index, col_index = ctx.saved_tensors
    margin, mining, *anchors_and_chunks = ctx.args
    return ops.triplet_backward(grad, img, txt, labels, margin, mining, row_saved, col_saved, row_index, col_index,
                                *anchors_and_chunks)


_engine.register_loss("triplet", forward_fake=_forward_fake, backward_fake=_backward_fake,
                      setup_context=_setup_context, backward=_backward)
