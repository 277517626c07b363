"""The unified pair-similarity loss (spec §4.2): a log-sum-exp over each anchor's negatives.

Its pieces, by name: csrc/common/unified.h (each anchor's running log-sum-exp),
csrc/common/unified_op.h (unified_forward / unified_backward on the engine),
csrc/cpu/unified.cpp, csrc/cuda/unified.cu, the schemas in csrc/ops.cpp; tested by
python_tests/test_unified.py; benchmarked by benchmarks/bench_losses.py (variant unified).
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_bool, check_finite, check_labels, check_scalar_tensor
from . import _engine

__all__ = ["UnifiedLoss", "unified_loss"]


Scale = float | torch.Tensor


def _check_options(scale, margin, normalize, reduction, group, chunk_size, label_positives, device=None):
    """unified_loss's keywords, checked (the function per call, UnifiedLoss at construction,
    where the inputs' device is not known yet): (scale, margin, normalize, reduction, group,
    chunk_size, label_positives); a tensor scale stays a tensor."""
    scale = check_scalar_tensor("scale", scale, device=device, positive=True)
    margin = check_finite("margin", margin)
    normalize, reduction, group, chunk_size = _engine.check_engine_options(normalize, reduction, group, chunk_size)
    label_positives = check_bool("label_positives", label_positives)
    return scale, margin, normalize, reduction, group, chunk_size, label_positives


def unified_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    *,
    scale: Scale = 20.0,
    margin: float = 0.2,
    labels: torch.Tensor | None = None,
    normalize: bool = False,
    reduction: str = "sum",
    group=None,
    chunk_size: int | None = None,
    label_positives: bool = False,
) -> torch.Tensor:
    """Unified pair-similarity loss of the paired batch on S = img·txtᵀ (spec §4.2, no 1/γ).

    ``L = Σ_i log(1 + Σ_j exp(γ (S_ij − S_ii + m))) + Σ_j log(1 + Σ_i exp(γ (S_ij − S_jj + m)))``

    over the valid negatives j ≠ i (and, with ``labels``, ``labels[j] != labels[i]``), γ =
    ``scale``. Each log is a log-sum-exp with the constant 0 term and an online maximum, so
    large γ neither overflows nor underflows. m = 0, γ = 1/τ is symmetric InfoNCE; (1/γ)·L
    tends to the hardest-negative triplet loss as γ → ∞. An anchor without a valid negative
    contributes 0.

    A learnable temperature: pass ``scale`` as a 0-dim tensor that requires grad. Its gradient
    (spec §8.1) comes from the forward's own sweep, no extra GEMM:
    ``∂L/∂γ = Σ_i Σ_j p_ij (S_ij − S_ii + m) + (the same over columns)``, p_ij the softmax weight
    of negative j in anchor i's log-sum-exp (the constant term included). CLIP's ``logit_scale``
    is a log: pass ``scale=logit_scale.exp()`` (clamped at 100 as CLIP does) and autograd
    applies the chain rule. Under ``group=`` each rank's loss, and so its scale gradient,
    covers its own anchors: summed over ranks (what DDP's averaging of a replicated parameter
    divides by the world size) it is the gradient of the whole batch's loss.

    Positives from labels (``label_positives=True``, spec §8.3; needs ``labels``): every pair
    sharing the anchor's label is a positive instead of a masked pair (COCO's 5 captions per
    image). With P(i) = {p : labels[p] == labels[i]}, i included, anchor i's term is

    ``L_i = mean_{p ∈ P(i)} log(1 + Σ_{j ∉ P(i)} exp(γ (S_ij − S_ip + m)))``

    and the same for column anchors; with unique labels it is the loss above. Each positive
    competes only with the negatives, and the log's constant term is that positive itself.
    SupCon's L_out (Khosla et al. 2020) also averages over the positives outside the log, but
    puts the other positives in the denominator too (``−log(e^{γS_ip} / Σ_{a≠i} e^{γS_ia})``);
    its L_in averages inside the log. It costs a second sweep over S in the forward (the first
    gives each anchor's log-sum-exp over its negatives, the second visits the same-label pairs
    with it known): about one more GEMM of S, still O(N) memory.

    Args:
        img, txt: [N, D] float16/bfloat16/float32/float64 embeddings, same dtype and device
            (half types are computed in float32; loss and gradients in the input dtype).
        scale: γ > 0, a number or a 0-dim floating tensor on the CPU or the inputs' device
            (read once per forward and backward: on CUDA that waits for its value).
        margin: m, a finite number.
        labels: optional int64 [N] image ids; same-label pairs are never negatives.
        normalize: L2-normalize img and txt first (``F.normalize``).
        reduction: "sum" or "mean" (sum / N).
        group: a ``torch.distributed`` process group: negatives come from every rank of it,
            anchors stay local (see :mod:`vse_cuda.distributed`); the sum of the ranks' losses
            is the loss of the concatenated batch, gradients included. None: this process only.
        chunk_size: rows of S per chunk (default: from the memory budget).
        label_positives: same-label pairs are positives (above) instead of masked negatives.

    Returns:
        0-dim tensor in ``img.dtype``, differentiable with respect to img, txt and a tensor scale.
    """
    n = _engine.check_pair(img, txt, group=group)
    scale, margin, normalize, reduction, group, chunk_size, label_positives = _check_options(
        scale, margin, normalize, reduction, group, chunk_size, label_positives, img.device)
    labels = check_labels("labels", labels, n, img.device)
    if label_positives and labels is None:
        raise ValueError("label_positives=True needs labels (the ids whose shared values make pairs positives)")
    batch = _engine.gather((img, txt), labels, group, normalize, chunk_size)
    # ∂L/∂γ costs the forward about a tenth more: computed only for a scale that will get it.
    learns_scale = isinstance(scale, torch.Tensor) and scale.requires_grad and torch.is_grad_enabled()
    total = batch.ops.unified_forward(*batch.embeddings, batch.labels, _engine.scalar_tensor(scale), margin,
                                      learns_scale, label_positives, *batch.tiles)[0]
    return batch.reduce(total, reduction)


class UnifiedLoss(nn.Module):
    """:func:`unified_loss` as a module: the keywords are fixed at construction (and checked
    there), ``forward(img, txt, labels=None, scale=None)`` takes the batch. A ``scale`` given
    as an ``nn.Parameter`` is the module's parameter (learnable with it); one given to
    ``forward`` replaces the module's for that call (e.g. ``logit_scale.exp()`` of a model)."""

    def __init__(self, *, scale: Scale = 20.0, margin: float = 0.2, normalize: bool = False,
                 reduction: str = "sum", group=None, chunk_size: int | None = None, label_positives: bool = False):
        super().__init__()
        (self.scale, self.margin, self.normalize, self.reduction, self.group, self.chunk_size,
         self.label_positives) = _check_options(scale, margin, normalize, reduction, group, chunk_size,
                                                label_positives)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor | None = None,
                scale: Scale | None = None) -> torch.Tensor:
        return unified_loss(img, txt, scale=self.scale if scale is None else scale, margin=self.margin,
                            labels=labels, normalize=self.normalize, reduction=self.reduction, group=self.group,
                            chunk_size=self.chunk_size, label_positives=self.label_positives)

    def extra_repr(self) -> str:
        scale = self.scale if not isinstance(self.scale, torch.Tensor) else f"<{type(self.scale).__name__}>"
        return (f"scale={scale}, margin={self.margin}, normalize={self.normalize}, reduction={self.reduction!r}, "
                f"label_positives={self.label_positives}")


# ------------------------------------------------------------------ fake kernels and autograd

def _saved_width(label_positives: bool) -> int:
    """Values saved per anchor: UnifiedPolicy's 3, LabelPositivesPolicy's 5 (csrc/common/unified.h)."""
    return 5 if label_positives else 3


def _forward_fake(img, txt, labels, scale, margin, scale_grad, label_positives, anchor_begin, anchor_end, row_chunk,
                  col_chunk):
    n, acc, width = img.size(0), _engine.acc_dtype(img.dtype), _saved_width(label_positives)
    saved = (img.new_empty(n, width, dtype=acc), img.new_empty(n, width, dtype=acc))
    return img.new_empty((), dtype=acc), *saved, img.new_empty((), dtype=acc)


def _backward_fake(grad, img, txt, labels, scale, margin, label_positives, row_saved, col_saved, anchor_begin,
                   anchor_end, row_chunk, col_chunk):
    return img.new_empty(img.shape), txt.new_empty(txt.shape)


def _setup_context(ctx, inputs, output):
    img, txt, labels, scale, margin, scale_grad, label_positives, *anchors_and_chunks = inputs
    _, row_saved, col_saved, d_scale = output
    ctx.mark_non_differentiable(row_saved, col_saved, d_scale)
    ctx.save_for_backward(img, txt, labels, scale, row_saved, col_saved, d_scale)
    ctx.args = (margin, scale_grad, label_positives, *anchors_and_chunks)


def _backward(ops, ctx, grad):
    """(d img, d txt, None for labels, d scale): the GEMMs run only for the embeddings that
    need them, the scale's gradient is the forward's ∂L/∂scale times ``grad``."""
    img, txt, labels, scale, row_saved, col_saved, d_scale = ctx.saved_tensors
    margin, scale_grad, label_positives, *anchors_and_chunks = ctx.args
    needs_img, needs_txt, _, needs_scale = ctx.needs_input_grad[:4]
    if needs_scale and not scale_grad:
        raise RuntimeError("unified_forward ran with scale_grad=False, so it has no gradient for the scale that "
                           "requires grad: pass scale_grad=True")
    grads = (None, None)
    if needs_img or needs_txt:
        grads = ops.unified_backward(grad, img, txt, labels, scale, margin, label_positives, row_saved, col_saved,
                                     *anchors_and_chunks)
    return (*grads, None, (grad * d_scale).to(scale.device, scale.dtype) if needs_scale else None)


_engine.register_loss("unified", forward_fake=_forward_fake, backward_fake=_backward_fake,
                      setup_context=_setup_context, backward=_backward)
