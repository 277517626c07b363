"""GOAL (spec §5): a weighted gradient injected at each anchor's positive and hardest negative.

Its pieces, by name: csrc/common/goal.h (the triplet and pair weights), csrc/common/goal_op.h
(goal_forward / goal_backward on the engine), csrc/cpu/goal.cpp, csrc/cuda/goal.cu, the schemas
in csrc/ops.cpp; tested by python_tests/test_goal.py; benchmarked by benchmarks/bench_losses.py
(variants goal_nca_sigms, goal_con_con).
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_choice, check_finite, check_labels
from . import _engine

TRIPLET_WEIGHTS = ("con", "nca", "cir")
PAIR_WEIGHTS = ("con", "lin", "sig", "lin_ms", "sig_ms")

__all__ = ["PAIR_WEIGHTS", "TRIPLET_WEIGHTS", "GoalLoss", "goal_loss"]


def _check_options(triplet_weight, pair_weight, tau, a, b, lam, normalize, reduction, group, chunk_size):
    """goal_loss's keywords, checked (the function per call, GoalLoss at construction):
    (triplet_weight, pair_weight, tau, a, b, lam, normalize, reduction, group, chunk_size)."""
    triplet_weight = check_choice("triplet_weight", triplet_weight, TRIPLET_WEIGHTS)
    pair_weight = check_choice("pair_weight", pair_weight, PAIR_WEIGHTS)
    tau = check_finite("tau", tau, positive=True)
    a = check_finite("a", a, positive=True)
    b = check_finite("b", b, positive=True)
    lam = check_finite("lam", lam)
    normalize, reduction, group, chunk_size = _engine.check_engine_options(normalize, reduction, group, chunk_size)
    return triplet_weight, pair_weight, tau, a, b, lam, normalize, reduction, group, chunk_size


def goal_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    *,
    triplet_weight: str = "con",
    pair_weight: str = "con",
    tau: float = 1.0,
    a: float = 2.0,
    b: float = 10.0,
    lam: float = 0.5,
    labels: torch.Tensor | None = None,
    normalize: bool = False,
    reduction: str = "sum",
    group=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """GOAL (spec §5) of the paired batch on S = img·txtᵀ: a gradient, not a loss.

    Per anchor (image rows i2t, caption columns t2i) with a valid in-batch negative, P = S_ii
    and N its hardest valid negative (no margin; the lowest index on ties). The value is the
    logging value ``Σ (N − P)`` over both directions; the backward injects, times
    ``grad_output``, ``∂/∂S_{i,c(i)} = w_t·w_n`` and ``∂/∂S_ii = −w_t·w_p`` per anchor, the
    weights held constant:

    * ``triplet_weight`` w_t: "con" 1, "nca" σ(τ(N − P)), "cir" σ(τ((1 − P)² + N² − 0.5));
    * ``pair_weight`` (w_p, w_n): "con" (1, 1), "lin" (1 − P, N),
      "sig" (1/(e^{a(P−λ)} + 1), 1/(e^{−b(N−λ)} + 1)), and with the batch's relative
      similarities R⁺, R⁻ (means over the sets of spec §5.2; 0 when empty)
      "sig_ms" (1/(e^{a(P−λ)} + R⁺), 1/(e^{−b(N−λ)} + R⁻)), "lin_ms" ((1 − R⁺)(1 − P), (1 + R⁻) N).

    Unlike the official code, the injected gradient is scaled by ``grad_output`` (equal at 1),
    so loss scaling works. An anchor without a valid negative contributes nothing.

    "sig_ms" is meant for cosine similarities (``normalize=True`` or L2-normalized encoders):
    an anchor whose negative set is empty has w_n = e^{b(N−λ)}, the exact weight, which
    exceeds float32's range (and float16/bfloat16's, computed in float32) once
    b(N − λ) > 88, e.g. N > 9.3 at the defaults, giving inf/NaN gradients; use float64 there.

    Args:
        img, txt: [N, D] float16/bfloat16/float32/float64 embeddings, same dtype and device.
        triplet_weight: "con" (default), "nca" or "cir".
        pair_weight: "con" (default), "lin", "sig", "lin_ms" or "sig_ms".
        tau: τ > 0 (nca, cir).
        a, b: the MS scales a > 0, b > 0 (sig, sig_ms).
        lam: λ, a finite number (sig, sig_ms).
        labels: optional int64 [N] image ids; same-label pairs are never negatives.
        normalize: L2-normalize img and txt first (``F.normalize``).
        reduction: "sum" or "mean" (value and gradient / N).
        group: a ``torch.distributed`` process group: negatives come from every rank of it,
            anchors stay local (see :mod:`vse_cuda.distributed`); the sum of the ranks' losses
            is the loss of the concatenated batch, gradients included. None: this process only.
        chunk_size: rows of S per chunk (default: from the memory budget).

    Returns:
        0-dim tensor in ``img.dtype`` whose backward injects the GOAL gradient into img and txt.
    """
    n = _engine.check_pair(img, txt, group=group)
    triplet_weight, pair_weight, tau, a, b, lam, normalize, reduction, group, chunk_size = _check_options(
        triplet_weight, pair_weight, tau, a, b, lam, normalize, reduction, group, chunk_size)
    labels = check_labels("labels", labels, n, img.device)
    batch = _engine.gather((img, txt), labels, group, normalize, chunk_size)
    total = batch.ops.goal_forward(*batch.embeddings, batch.labels, triplet_weight, pair_weight, tau, a, b, lam,
                                   *batch.tiles)[0]
    return batch.reduce(total, reduction)


class GoalLoss(nn.Module):
    """:func:`goal_loss` as a module: the keywords are fixed at construction (and checked
    there), ``forward(img, txt, labels=None)`` takes the batch."""

    def __init__(self, *, triplet_weight: str = "con", pair_weight: str = "con", tau: float = 1.0, a: float = 2.0,
                 b: float = 10.0, lam: float = 0.5, normalize: bool = False, reduction: str = "sum", group=None,
                 chunk_size: int | None = None):
        super().__init__()
        (self.triplet_weight, self.pair_weight, self.tau, self.a, self.b, self.lam, self.normalize, self.reduction,
         self.group, self.chunk_size) = _check_options(triplet_weight, pair_weight, tau, a, b, lam, normalize,
                                                       reduction, group, chunk_size)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return goal_loss(img, txt, triplet_weight=self.triplet_weight, pair_weight=self.pair_weight, tau=self.tau,
                         a=self.a, b=self.b, lam=self.lam, labels=labels, normalize=self.normalize,
                         reduction=self.reduction, group=self.group, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"triplet_weight={self.triplet_weight!r}, pair_weight={self.pair_weight!r}, tau={self.tau}, "
                f"a={self.a}, b={self.b}, lam={self.lam}, normalize={self.normalize}, reduction={self.reduction!r}")


# ------------------------------------------------------------------ fake kernels and autograd

def _forward_fake(img, txt, labels, triplet_weight, pair_weight, tau, a, b, lam, anchor_begin, anchor_end, row_chunk,
                  col_chunk):
    n, acc = img.size(0), _engine.acc_dtype(img.dtype)
    return (img.new_empty((), dtype=acc), img.new_empty(n, 2, dtype=acc), img.new_empty(n, 2, dtype=acc),
            img.new_empty(n, 1, dtype=torch.int64), img.new_empty(n, 1, dtype=torch.int64))


def _backward_fake(grad, img, txt, row_saved, col_saved, row_index, col_index):
    return img.new_empty(img.shape), txt.new_empty(txt.shape)


# GOAL's backward injects grad times the weights saved in forward (constants), not the
# derivative of the value.
def _setup_context(ctx, inputs, output):
    img, txt, *_ = inputs
    _, row_saved, col_saved, row_index, col_index = output
    ctx.mark_non_differentiable(row_saved, col_saved, row_index, col_index)
    ctx.save_for_backward(img, txt, row_saved, col_saved, row_index, col_index)


def _backward(ops, ctx, grad):
    return ops.goal_backward(grad, *ctx.saved_tensors)


_engine.register_loss("goal", forward_fake=_forward_fake, backward_fake=_backward_fake,
                      setup_context=_setup_context, backward=_backward)
