"""The unified pair-similarity loss (spec §4.2): a log-sum-exp over each anchor's negatives.

Its pieces, by name: csrc/common/unified.h (each anchor's running log-sum-exp),
csrc/common/unified_op.h (unified_forward / unified_backward on the engine),
csrc/cpu/unified.cpp, csrc/cuda/unified.cu, the schemas in csrc/ops.cpp; tested by
python_tests/test_unified.py; benchmarked by benchmarks/bench_losses.py (variant unified).
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_finite, check_labels
from . import _engine

__all__ = ["UnifiedLoss", "unified_loss"]


def _check_options(scale, margin, normalize, reduction, group, chunk_size):
    """unified_loss's keywords, checked (the function per call, UnifiedLoss at construction):
    (scale, margin, normalize, reduction, group, chunk_size)."""
    scale = check_finite("scale", scale, positive=True)
    margin = check_finite("margin", margin)
    normalize, reduction, group, chunk_size = _engine.check_engine_options(normalize, reduction, group, chunk_size)
    return scale, margin, normalize, reduction, group, chunk_size


def unified_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    *,
    scale: float = 20.0,
    margin: float = 0.2,
    labels: torch.Tensor | None = None,
    normalize: bool = False,
    reduction: str = "sum",
    group=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Unified pair-similarity loss of the paired batch on S = img·txtᵀ (spec §4.2, no 1/γ).

    ``L = Σ_i log(1 + Σ_j exp(γ (S_ij − S_ii + m))) + Σ_j log(1 + Σ_i exp(γ (S_ij − S_jj + m)))``

    over the valid negatives j ≠ i (and, with ``labels``, ``labels[j] != labels[i]``), γ =
    ``scale``. Each log is a log-sum-exp with the constant 0 term and an online maximum, so
    large γ neither overflows nor underflows. m = 0, γ = 1/τ is symmetric InfoNCE; (1/γ)·L
    tends to the hardest-negative triplet loss as γ → ∞. An anchor without a valid negative
    contributes 0.

    Args:
        img, txt: [N, D] float16/bfloat16/float32/float64 embeddings, same dtype and device
            (half types are computed in float32; loss and gradients in the input dtype).
        scale: γ > 0.
        margin: m, a finite number.
        labels: optional int64 [N] image ids; same-label pairs are never negatives.
        normalize: L2-normalize img and txt first (``F.normalize``).
        reduction: "sum" or "mean" (sum / N).
        group: a ``torch.distributed`` process group: negatives come from every rank of it,
            anchors stay local (see :mod:`vse_cuda.distributed`); the sum of the ranks' losses
            is the loss of the concatenated batch, gradients included. None: this process only.
        chunk_size: rows of S per chunk (default: from the memory budget).

    Returns:
        0-dim tensor in ``img.dtype``, differentiable with respect to img and txt.
    """
    n = _engine.check_pair(img, txt, group=group)
    scale, margin, normalize, reduction, group, chunk_size = _check_options(
        scale, margin, normalize, reduction, group, chunk_size)
    labels = check_labels("labels", labels, n, img.device)
    batch = _engine.gather((img, txt), labels, group, normalize, chunk_size)
    total = batch.ops.unified_forward(*batch.embeddings, batch.labels, scale, margin, *batch.tiles)[0]
    return batch.reduce(total, reduction)


class UnifiedLoss(nn.Module):
    """:func:`unified_loss` as a module: the keywords are fixed at construction (and checked
    there), ``forward(img, txt, labels=None)`` takes the batch."""

    def __init__(self, *, scale: float = 20.0, margin: float = 0.2, normalize: bool = False,
                 reduction: str = "sum", group=None, chunk_size: int | None = None):
        super().__init__()
        self.scale, self.margin, self.normalize, self.reduction, self.group, self.chunk_size = _check_options(
            scale, margin, normalize, reduction, group, chunk_size)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return unified_loss(img, txt, scale=self.scale, margin=self.margin, labels=labels,
                            normalize=self.normalize, reduction=self.reduction, group=self.group,
                            chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, margin={self.margin}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}")


# ------------------------------------------------------------------ fake kernels and autograd

def _forward_fake(img, txt, labels, scale, margin, anchor_begin, anchor_end, row_chunk, col_chunk):
    n, acc = img.size(0), _engine.acc_dtype(img.dtype)
    return img.new_empty((), dtype=acc), img.new_empty(n, 2, dtype=acc), img.new_empty(n, 2, dtype=acc)


def _backward_fake(grad, img, txt, labels, scale, margin, row_saved, col_saved, anchor_begin, anchor_end, row_chunk,
                   col_chunk):
    return img.new_empty(img.shape), txt.new_empty(txt.shape)


def _setup_context(ctx, inputs, output):
    img, txt, labels, scale, margin, *anchors_and_chunks = inputs
    _, row_saved, col_saved = output
    ctx.mark_non_differentiable(row_saved, col_saved)
    ctx.save_for_backward(img, txt, labels, row_saved, col_saved)
    ctx.args = (scale, margin, *anchors_and_chunks)


def _backward(ops, ctx, grad):
    img, txt, labels, row_saved, col_saved = ctx.saved_tensors
    scale, margin, *anchors_and_chunks = ctx.args
    return ops.unified_backward(grad, img, txt, labels, scale, margin, row_saved, col_saved, *anchors_and_chunks)


_engine.register_loss("unified", forward_fake=_forward_fake, backward_fake=_backward_fake,
                      setup_context=_setup_context, backward=_backward)
