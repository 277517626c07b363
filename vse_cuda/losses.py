"""In-batch image–text retrieval losses over the chunked engine (DESIGN §3): the triplet loss
(VSE0 / VSE++ / top-k mining) and the unified loss, as functions and ``nn.Module``s.

The N×N similarity matrix is never materialized: S = img·txtᵀ is computed in row chunks
whose size comes from a memory budget, each chunk reduced to per-row and per-column state.
Gradients are exact and deterministic (no floating-point atomics); the oracle they are
tested against is :mod:`vse_cuda.reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _lib
from ._chunking import plan_chunks
from ._validation import (
    check_bool,
    check_choice,
    check_compatible,
    check_embeddings,
    check_finite,
    check_int,
    check_labels,
)

MINING_MODES = ("hardest", "all", "topk")
REDUCTIONS = ("sum", "mean")

__all__ = ["TripletLoss", "UnifiedLoss", "triplet_loss", "unified_loss"]


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
        group: negatives gathered across ranks; not implemented yet (raises).
        chunk_size: rows of S per chunk (default: from the memory budget).

    Returns:
        0-dim tensor in ``img.dtype``, differentiable with respect to img and txt.
    """
    n = _check_pair(img, txt)
    margin = check_finite("margin", margin)
    mining = check_choice("mining", mining, MINING_MODES)
    check_int("k", k, 1)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    check_bool("normalize", normalize)
    labels = check_labels("labels", labels, n, img.device)
    _check_group("triplet_loss", group)
    chunks = _chunks(n, img.dtype, chunk_size)
    out_dtype = img.dtype
    img, txt = _prepare(img, txt, normalize)
    k = min(k, n) if mining == "topk" else 1
    op = _lib.ops(img, txt).triplet_forward
    total = op(img, txt, _labels_or_empty(labels, img), margin, mining, k, chunks.rows, chunks.cols)[0]
    return _reduce(total, n, reduction).to(out_dtype)


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
        group: negatives gathered across ranks; not implemented yet (raises).
        chunk_size: rows of S per chunk (default: from the memory budget).

    Returns:
        0-dim tensor in ``img.dtype``, differentiable with respect to img and txt.
    """
    n = _check_pair(img, txt)
    scale = check_finite("scale", scale, positive=True)
    margin = check_finite("margin", margin)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    check_bool("normalize", normalize)
    labels = check_labels("labels", labels, n, img.device)
    _check_group("unified_loss", group)
    chunks = _chunks(n, img.dtype, chunk_size)
    out_dtype = img.dtype
    img, txt = _prepare(img, txt, normalize)
    op = _lib.ops(img, txt).unified_forward
    total = op(img, txt, _labels_or_empty(labels, img), scale, margin, chunks.rows, chunks.cols)[0]
    return _reduce(total, n, reduction).to(out_dtype)


class TripletLoss(nn.Module):
    """:func:`triplet_loss` as a module: the keywords are fixed at construction (and checked
    there), ``forward(img, txt, labels=None)`` takes the batch."""

    def __init__(self, *, margin: float = 0.2, mining: str = "hardest", k: int = 1, normalize: bool = False,
                 reduction: str = "sum", group=None, chunk_size: int | None = None):
        super().__init__()
        self.margin = check_finite("margin", margin)
        self.mining = check_choice("mining", mining, MINING_MODES)
        self.k = check_int("k", k, 1)
        self.normalize = check_bool("normalize", normalize)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        _check_group("TripletLoss", group)
        self.group = group
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, 1)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return triplet_loss(img, txt, margin=self.margin, mining=self.mining, k=self.k, labels=labels,
                            normalize=self.normalize, reduction=self.reduction, group=self.group,
                            chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.mining == "topk" else ""
        return (f"margin={self.margin}, mining={self.mining!r}{k}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}")


class UnifiedLoss(nn.Module):
    """:func:`unified_loss` as a module: the keywords are fixed at construction (and checked
    there), ``forward(img, txt, labels=None)`` takes the batch."""

    def __init__(self, *, scale: float = 20.0, margin: float = 0.2, normalize: bool = False,
                 reduction: str = "sum", group=None, chunk_size: int | None = None):
        super().__init__()
        self.scale = check_finite("scale", scale, positive=True)
        self.margin = check_finite("margin", margin)
        self.normalize = check_bool("normalize", normalize)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        _check_group("UnifiedLoss", group)
        self.group = group
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, 1)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return unified_loss(img, txt, scale=self.scale, margin=self.margin, labels=labels,
                            normalize=self.normalize, reduction=self.reduction, group=self.group,
                            chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, margin={self.margin}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}")


# ------------------------------------------------------------------------------- helpers

def _check_pair(img: object, txt: object) -> int:
    """Paired [N, D] embeddings with N >= 1; returns N."""
    check_embeddings("img", img)
    check_embeddings("txt", txt)
    check_compatible(("img", "txt"), (img, txt))
    if txt.size(0) != img.size(0):
        raise ValueError(f"txt has N={txt.size(0)} rows but img has N={img.size(0)}: the inputs are paired")
    if img.size(0) == 0:
        raise ValueError("img and txt must hold at least one pair, got N=0")
    return img.size(0)


def _check_group(name: str, group: object) -> None:
    if group is not None:
        raise NotImplementedError(
            f"{name}: group= (negatives gathered across ranks) is not implemented yet; "
            "see the distributed issue")


def _chunks(n: int, dtype: torch.dtype, chunk_size: int | None):
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    return plan_chunks(n, n, dtype, chunk_size)


def _prepare(img: torch.Tensor, txt: torch.Tensor, normalize: bool):
    """With ``normalize``, L2-normalized copies in the compute dtype (half types in float32,
    as the engine computes), so autograd takes the gradient through the normalization."""
    if normalize:
        dtype = torch.float64 if img.dtype == torch.float64 else torch.float32
        img, txt = F.normalize(img.to(dtype), dim=1), F.normalize(txt.to(dtype), dim=1)
    return img, txt


def _labels_or_empty(labels: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0, dtype=torch.int64) if labels is None else labels


def _reduce(total: torch.Tensor, n: int, reduction: str) -> torch.Tensor:
    return total / n if reduction == "mean" else total


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ fake kernels and autograd

def _register(namespace: str) -> None:
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(f"{namespace}::triplet_forward")
    def _(img, txt, labels, margin, mining, k, row_chunk, col_chunk):
        n, acc = img.size(0), _acc_dtype(img.dtype)
        width = 2 if mining == "all" else 1 if mining == "hardest" else min(k, max(n, 1))
        index_width = 0 if mining == "all" else width
        return (img.new_empty((), dtype=acc), img.new_empty(n, width, dtype=acc), img.new_empty(n, width, dtype=acc),
                img.new_empty(n, index_width, dtype=torch.int64), img.new_empty(n, index_width, dtype=torch.int64))

    @torch.library.register_fake(f"{namespace}::triplet_backward")
    def _(grad, img, txt, labels, margin, mining, row_saved, col_saved, row_index, col_index, row_chunk, col_chunk):
        return img.new_empty(img.shape), txt.new_empty(txt.shape)

    @torch.library.register_fake(f"{namespace}::unified_forward")
    def _(img, txt, labels, scale, margin, row_chunk, col_chunk):
        n, acc = img.size(0), _acc_dtype(img.dtype)
        return img.new_empty((), dtype=acc), img.new_empty(n, 2, dtype=acc), img.new_empty(n, 2, dtype=acc)

    @torch.library.register_fake(f"{namespace}::unified_backward")
    def _(grad, img, txt, labels, scale, margin, row_saved, col_saved, row_chunk, col_chunk):
        return img.new_empty(img.shape), txt.new_empty(txt.shape)

    # Only the loss is differentiable; the saved state and index lists are constants.
    def setup_triplet(ctx, inputs, output):
        img, txt, labels, margin, mining, k, row_chunk, col_chunk = inputs
        _, row_saved, col_saved, row_index, col_index = output
        ctx.mark_non_differentiable(row_saved, col_saved, row_index, col_index)
        ctx.save_for_backward(img, txt, labels, row_saved, col_saved, row_index, col_index)
        ctx.args = (margin, mining, row_chunk, col_chunk)

    def backward_triplet(ctx, grad, *_):
        img, txt, labels, row_saved, col_saved, row_index, col_index = ctx.saved_tensors
        margin, mining, row_chunk, col_chunk = ctx.args
        grad_img, grad_txt = ops.triplet_backward(grad, img, txt, labels, margin, mining, row_saved, col_saved,
                                                  row_index, col_index, row_chunk, col_chunk)
        return grad_img, grad_txt, None, None, None, None, None, None

    def setup_unified(ctx, inputs, output):
        img, txt, labels, scale, margin, row_chunk, col_chunk = inputs
        _, row_saved, col_saved = output
        ctx.mark_non_differentiable(row_saved, col_saved)
        ctx.save_for_backward(img, txt, labels, row_saved, col_saved)
        ctx.args = (scale, margin, row_chunk, col_chunk)

    def backward_unified(ctx, grad, *_):
        img, txt, labels, row_saved, col_saved = ctx.saved_tensors
        scale, margin, row_chunk, col_chunk = ctx.args
        grad_img, grad_txt = ops.unified_backward(grad, img, txt, labels, scale, margin, row_saved, col_saved,
                                                  row_chunk, col_chunk)
        return grad_img, grad_txt, None, None, None, None, None

    torch.library.register_autograd(f"{namespace}::triplet_forward", backward_triplet, setup_context=setup_triplet)
    torch.library.register_autograd(f"{namespace}::unified_forward", backward_unified, setup_context=setup_unified)


_register("vse_cuda")
if "simt" in _lib.backends():
    _register("vse_simt")
