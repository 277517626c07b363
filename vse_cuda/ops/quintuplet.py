"""The AOQ adaptive offline quintuplet loss (spec §3.3): in-batch hardest negatives weighted by
the offline ones, plus four offline hinges.

Its pieces, by name: csrc/common/quintuplet.h (the six terms and their weights),
csrc/common/quintuplet_op.h (quintuplet_forward / quintuplet_backward on the engine),
csrc/cpu/quintuplet.cpp, csrc/cuda/quintuplet.cu, the schemas in csrc/ops.cpp; the offline
negatives come from :mod:`vse_cuda.mining`; tested by python_tests/test_quintuplet.py;
benchmarked by benchmarks/bench_losses.py (variant quintuplet).
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_bool, check_finite, check_labels
from . import _engine

__all__ = ["QuintupletLoss", "quintuplet_loss"]


def _check_options(margin_online, margin_offline, alpha, beta, detach_weights, normalize, reduction, group,
                   chunk_size):
    """quintuplet_loss's keywords, checked (the function per call, QuintupletLoss at
    construction): (margin_online, margin_offline, alpha, beta, detach_weights, normalize,
    reduction, group, chunk_size)."""
    margin_online = check_finite("margin_online", margin_online)
    margin_offline = check_finite("margin_offline", margin_offline)
    alpha = check_finite("alpha", alpha, positive=True)
    beta = check_finite("beta", beta)
    check_bool("detach_weights", detach_weights)
    normalize, reduction, group, chunk_size = _engine.check_engine_options(normalize, reduction, group, chunk_size)
    return margin_online, margin_offline, alpha, beta, detach_weights, normalize, reduction, group, chunk_size


def quintuplet_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    off_img: torch.Tensor,
    off_txt: torch.Tensor,
    img2: torch.Tensor,
    txt2: torch.Tensor,
    *,
    margin_online: float = 0.2,
    margin_offline: float = 0.0,
    alpha: float = 0.3,
    beta: float = 1.5,
    detach_weights: bool = False,
    labels: torch.Tensor | None = None,
    normalize: bool = False,
    reduction: str = "sum",
    group=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """AOQ adaptive offline quintuplet loss (spec §3.3) of the paired batch on S = img·txtᵀ.

    Per anchor i, with p = S_ii, u = S_{i,c(i)} and w = S_{r(i),i} the hardest valid in-batch
    negatives of row i and column i (the lowest index on ties), and the offline scores
    x = ⟨img_i, off_txt_i⟩, y = ⟨off_img_i, txt_i⟩, q = ⟨off_img_i, off_txt_i⟩, z = ⟨img2_i, txt2_i⟩:

    ``L = Σ_i ω_i [m₁ + u_i − p_i]_+ + ν_i [m₁ + w_i − p_i]_+ + Σ_{s ∈ x,y,q,z} [m₂ + s_i − p_i]_+``

    with the adaptive weights ``ω = β − (x − u)/α`` and ``ν = β − (y − w)/α`` (unclamped). An
    online term whose anchor has no valid in-batch negative is 0; the four offline terms always
    count. The hinge's gradient at exactly 0 is 0.

    Args:
        img, txt: [N, D] the batch's pairs (I, T).
        off_img, off_txt: [N, D] the offline hard negatives (Ĩ, T̃) of each pair.
        img2, txt2: [N, D] the pairs (I′, T′) sharing no anchor with (I, T).
            All six: float16/bfloat16/float32/float64, same shape, dtype and device (half
            types are computed in float32; the loss and the gradients come back in the input
            dtype).
        margin_online: m₁, a finite number.
        margin_offline: m₂, a finite number.
        alpha: α > 0.
        beta: β, a finite number.
        detach_weights: treat ω, ν as constants; False (the official code) lets the gradient
            flow through them (spec §3.5).
        labels: optional int64 [N] image ids; same-label in-batch pairs are never negatives
            (the offline terms are not masked).
        normalize: L2-normalize all six inputs first (``F.normalize``).
        reduction: "sum" or "mean" (sum / N).
        group: a ``torch.distributed`` process group: negatives come from every rank of it,
            anchors stay local (see :mod:`vse_cuda.distributed`); the sum of the ranks' losses
            is the loss of the concatenated batch, gradients included. None: this process only.
        chunk_size: rows of S per chunk (default: from the memory budget).

    Returns:
        0-dim tensor in ``img.dtype``, differentiable with respect to all six inputs.
    """
    n = _engine.check_pair(img, txt, group=group, off_img=off_img, off_txt=off_txt, img2=img2, txt2=txt2)
    margin_online, margin_offline, alpha, beta, detach_weights, normalize, reduction, group, chunk_size = (
        _check_options(margin_online, margin_offline, alpha, beta, detach_weights, normalize, reduction, group,
                       chunk_size))
    labels = check_labels("labels", labels, n, img.device)
    batch = _engine.gather((img, txt, off_img, off_txt, img2, txt2), labels, group, normalize, chunk_size)
    total = batch.ops.quintuplet_forward(*batch.embeddings, batch.labels, margin_online, margin_offline, alpha, beta,
                                         detach_weights, *batch.tiles)[0]
    return batch.reduce(total, reduction)


class QuintupletLoss(nn.Module):
    """:func:`quintuplet_loss` as a module: the keywords are fixed at construction (and checked
    there), ``forward(img, txt, off_img, off_txt, img2, txt2, labels=None)`` takes the batch."""

    def __init__(self, *, margin_online: float = 0.2, margin_offline: float = 0.0, alpha: float = 0.3,
                 beta: float = 1.5, detach_weights: bool = False, normalize: bool = False, reduction: str = "sum",
                 group=None, chunk_size: int | None = None):
        super().__init__()
        (self.margin_online, self.margin_offline, self.alpha, self.beta, self.detach_weights, self.normalize,
         self.reduction, self.group, self.chunk_size) = _check_options(
            margin_online, margin_offline, alpha, beta, detach_weights, normalize, reduction, group, chunk_size)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, off_img: torch.Tensor, off_txt: torch.Tensor,
                img2: torch.Tensor, txt2: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return quintuplet_loss(img, txt, off_img, off_txt, img2, txt2, margin_online=self.margin_online,
                               margin_offline=self.margin_offline, alpha=self.alpha, beta=self.beta,
                               detach_weights=self.detach_weights, labels=labels, normalize=self.normalize,
                               reduction=self.reduction, group=self.group, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"margin_online={self.margin_online}, margin_offline={self.margin_offline}, alpha={self.alpha}, "
                f"beta={self.beta}, detach_weights={self.detach_weights}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}")


# ------------------------------------------------------------------ fake kernels and autograd

def _forward_fake(img, txt, off_img, off_txt, img2, txt2, labels, margin_online, margin_offline, alpha, beta,
                  detach_weights, anchor_begin, anchor_end, row_chunk, col_chunk):
    n, acc = img.size(0), _engine.acc_dtype(img.dtype)
    return (img.new_empty((), dtype=acc), img.new_empty(n, 7, dtype=acc), img.new_empty(n, 1, dtype=torch.int64),
            img.new_empty(n, 1, dtype=torch.int64))


def _backward_fake(grad, img, txt, off_img, off_txt, img2, txt2, saved, row_index, col_index):
    return tuple(x.new_empty(x.shape) for x in (img, txt, off_img, off_txt, img2, txt2))


def _setup_context(ctx, inputs, output):
    embeddings = inputs[:6]
    _, saved, row_index, col_index = output
    ctx.mark_non_differentiable(saved, row_index, col_index)
    ctx.save_for_backward(*embeddings, saved, row_index, col_index)


def _backward(ops, ctx, grad):
    return ops.quintuplet_backward(grad, *ctx.saved_tensors)


_engine.register_loss("quintuplet", forward_fake=_forward_fake, backward_fake=_backward_fake,
                      setup_context=_setup_context, backward=_backward)
