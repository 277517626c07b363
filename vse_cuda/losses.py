"""In-batch image–text retrieval losses over the chunked engine (DESIGN §3): the triplet loss
(VSE0 / VSE++ / top-k mining), the unified loss, the AOQ quintuplet loss and GOAL, as
functions and ``nn.Module``s.

The N×N similarity matrix is never materialized: S = img·txtᵀ is computed in row chunks
whose size comes from a memory budget, each chunk reduced to per-row and per-column state.
Gradients are exact and deterministic (no floating-point atomics); the oracle they are
tested against is :mod:`vse_cuda.reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _lib, distributed
from ._chunking import plan_chunks
from ._validation import (
    check_bool,
    check_choice,
    check_compatible,
    check_embeddings,
    check_finite,
    check_group,
    check_int,
    check_labels,
)

MINING_MODES = ("hardest", "all", "topk")
REDUCTIONS = ("sum", "mean")
TRIPLET_WEIGHTS = ("con", "nca", "cir")
PAIR_WEIGHTS = ("con", "lin", "sig", "lin_ms", "sig_ms")
#: The engine ops' embedding arguments in order (the pair losses take the first two).
_EMBEDDING_NAMES = ("img", "txt", "off_img", "off_txt", "img2", "txt2")

__all__ = ["GoalLoss", "QuintupletLoss", "TripletLoss", "UnifiedLoss", "goal_loss", "quintuplet_loss", "triplet_loss",
           "unified_loss"]


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
    n = _check_pair(img, txt, group=group)
    margin = check_finite("margin", margin)
    mining = check_choice("mining", mining, MINING_MODES)
    check_int("k", k, 1)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    check_bool("normalize", normalize)
    labels = check_labels("labels", labels, n, img.device)
    # The op lists min(k, N) negatives per anchor for "topk" and ignores k otherwise.
    return _engine_loss("triplet_forward", (img, txt), labels, group, normalize, chunk_size, reduction,
                        margin, mining, k)


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
    n = _check_pair(img, txt, group=group)
    scale = check_finite("scale", scale, positive=True)
    margin = check_finite("margin", margin)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    check_bool("normalize", normalize)
    labels = check_labels("labels", labels, n, img.device)
    return _engine_loss("unified_forward", (img, txt), labels, group, normalize, chunk_size, reduction,
                        scale, margin)


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
    n = _check_pair(img, txt, group=group, off_img=off_img, off_txt=off_txt, img2=img2, txt2=txt2)
    margin_online = check_finite("margin_online", margin_online)
    margin_offline = check_finite("margin_offline", margin_offline)
    alpha = check_finite("alpha", alpha, positive=True)
    beta = check_finite("beta", beta)
    check_bool("detach_weights", detach_weights)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    check_bool("normalize", normalize)
    labels = check_labels("labels", labels, n, img.device)
    return _engine_loss("quintuplet_forward", (img, txt, off_img, off_txt, img2, txt2), labels, group, normalize,
                        chunk_size, reduction, margin_online, margin_offline, alpha, beta, detach_weights)


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
    n = _check_pair(img, txt, group=group)
    triplet_weight = check_choice("triplet_weight", triplet_weight, TRIPLET_WEIGHTS)
    pair_weight = check_choice("pair_weight", pair_weight, PAIR_WEIGHTS)
    tau = check_finite("tau", tau, positive=True)
    a = check_finite("a", a, positive=True)
    b = check_finite("b", b, positive=True)
    lam = check_finite("lam", lam)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    check_bool("normalize", normalize)
    labels = check_labels("labels", labels, n, img.device)
    return _engine_loss("goal_forward", (img, txt), labels, group, normalize, chunk_size, reduction,
                        triplet_weight, pair_weight, tau, a, b, lam)


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
        _check_group(group)
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
        _check_group(group)
        self.group = group
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, 1)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return unified_loss(img, txt, scale=self.scale, margin=self.margin, labels=labels,
                            normalize=self.normalize, reduction=self.reduction, group=self.group,
                            chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, margin={self.margin}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}")


class QuintupletLoss(nn.Module):
    """:func:`quintuplet_loss` as a module: the keywords are fixed at construction (and checked
    there), ``forward(img, txt, off_img, off_txt, img2, txt2, labels=None)`` takes the batch."""

    def __init__(self, *, margin_online: float = 0.2, margin_offline: float = 0.0, alpha: float = 0.3,
                 beta: float = 1.5, detach_weights: bool = False, normalize: bool = False, reduction: str = "sum",
                 group=None, chunk_size: int | None = None):
        super().__init__()
        self.margin_online = check_finite("margin_online", margin_online)
        self.margin_offline = check_finite("margin_offline", margin_offline)
        self.alpha = check_finite("alpha", alpha, positive=True)
        self.beta = check_finite("beta", beta)
        self.detach_weights = check_bool("detach_weights", detach_weights)
        self.normalize = check_bool("normalize", normalize)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        _check_group(group)
        self.group = group
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, 1)

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


class GoalLoss(nn.Module):
    """:func:`goal_loss` as a module: the keywords are fixed at construction (and checked
    there), ``forward(img, txt, labels=None)`` takes the batch."""

    def __init__(self, *, triplet_weight: str = "con", pair_weight: str = "con", tau: float = 1.0, a: float = 2.0,
                 b: float = 10.0, lam: float = 0.5, normalize: bool = False, reduction: str = "sum", group=None,
                 chunk_size: int | None = None):
        super().__init__()
        self.triplet_weight = check_choice("triplet_weight", triplet_weight, TRIPLET_WEIGHTS)
        self.pair_weight = check_choice("pair_weight", pair_weight, PAIR_WEIGHTS)
        self.tau = check_finite("tau", tau, positive=True)
        self.a = check_finite("a", a, positive=True)
        self.b = check_finite("b", b, positive=True)
        self.lam = check_finite("lam", lam)
        self.normalize = check_bool("normalize", normalize)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        _check_group(group)
        self.group = group
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size, 1)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return goal_loss(img, txt, triplet_weight=self.triplet_weight, pair_weight=self.pair_weight, tau=self.tau,
                         a=self.a, b=self.b, lam=self.lam, labels=labels, normalize=self.normalize,
                         reduction=self.reduction, group=self.group, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"triplet_weight={self.triplet_weight!r}, pair_weight={self.pair_weight!r}, tau={self.tau}, "
                f"a={self.a}, b={self.b}, lam={self.lam}, normalize={self.normalize}, reduction={self.reduction!r}")


# ------------------------------------------------------------------------------- helpers

def _check_pair(img: object, txt: object, *, group: object = None, **more: object) -> int:
    """Paired [N, D] embeddings (img, txt and any further ones, by name); returns N. N >= 1,
    except for a rank of a group, whose shard may be empty (the group still has pairs)."""
    names, tensors = ("img", "txt", *more), (img, txt, *more.values())
    for name, x in zip(names, tensors):
        check_embeddings(name, x)
    check_compatible(names, tensors)
    for name, x in zip(names[1:], tensors[1:]):
        if x.size(0) != img.size(0):
            raise ValueError(f"{name} has N={x.size(0)} rows but img has N={img.size(0)}: the inputs are paired")
    if img.size(0) == 0 and group is None:
        raise ValueError("img and txt must hold at least one pair, got N=0")
    return img.size(0)


def _check_group(group: object) -> None:
    check_group("group", group)


def _distribute(group, labels: torch.Tensor | None, *embeddings: torch.Tensor):
    """Under ``group``: the group's embeddings (differentiable) and labels concatenated in rank
    order, and this rank's pairs [begin, end) in them, whose anchors the loss terms are for.
    Without: the inputs and all their pairs."""
    if group is None:
        return (*embeddings, labels, (0, embeddings[0].size(0)))
    shard = distributed.exchange_shapes("img", embeddings[0], group, flags=(labels is not None,))
    gathered = [distributed.gather_with_grad(x, group) for x in embeddings]
    if labels is not None:
        labels = distributed.gather(labels, shard, group)
    return (*gathered, labels, (shard.begin, shard.end))


def _engine_loss(op_name: str, embeddings: tuple[torch.Tensor, ...], labels: torch.Tensor | None, group,
                 normalize: bool, chunk_size: int | None, reduction: str, *options) -> torch.Tensor:
    """What every loss does once its arguments are checked: normalize, gather across the group,
    plan the chunks, run the op ``op_name(*embeddings, labels, *options, anchors, chunks)`` and
    reduce, in the dtype of the inputs."""
    _check_group(group)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    out_dtype = embeddings[0].dtype
    *embeddings, labels, anchors = _distribute(group, labels, *_prepare(normalize, *embeddings))
    n = embeddings[0].size(0)
    if n == 0:  # every rank of the group saw the same total
        raise ValueError("the group holds no pairs: every rank passed N=0")
    chunks = plan_chunks(n, n, embeddings[0].dtype, chunk_size)
    op = getattr(_lib.ops(*embeddings, names=_EMBEDDING_NAMES), op_name)
    total = op(*embeddings, _labels_or_empty(labels, embeddings[0]), *options, *anchors, chunks.rows, chunks.cols)[0]
    return _reduce(total, n, reduction).to(out_dtype)


def _prepare(normalize: bool, *embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """With ``normalize``, L2-normalized copies in the compute dtype (half types in float32,
    as the engine computes), so autograd takes the gradient through the normalization."""
    if normalize:
        dtype = _acc_dtype(embeddings[0].dtype)
        embeddings = tuple(F.normalize(x.to(dtype), dim=1) for x in embeddings)
    return embeddings


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
    def _(img, txt, labels, margin, mining, k, anchor_begin, anchor_end, row_chunk, col_chunk):
        n, acc = img.size(0), _acc_dtype(img.dtype)
        width = 2 if mining == "all" else 1 if mining == "hardest" else min(k, max(n, 1))
        index_width = 0 if mining == "all" else width
        return (img.new_empty((), dtype=acc), img.new_empty(n, width, dtype=acc), img.new_empty(n, width, dtype=acc),
                img.new_empty(n, index_width, dtype=torch.int64), img.new_empty(n, index_width, dtype=torch.int64))

    @torch.library.register_fake(f"{namespace}::triplet_backward")
    def _(grad, img, txt, labels, margin, mining, row_saved, col_saved, row_index, col_index, anchor_begin, anchor_end,
          row_chunk, col_chunk):
        return img.new_empty(img.shape), txt.new_empty(txt.shape)

    @torch.library.register_fake(f"{namespace}::unified_forward")
    def _(img, txt, labels, scale, margin, anchor_begin, anchor_end, row_chunk, col_chunk):
        n, acc = img.size(0), _acc_dtype(img.dtype)
        return img.new_empty((), dtype=acc), img.new_empty(n, 2, dtype=acc), img.new_empty(n, 2, dtype=acc)

    @torch.library.register_fake(f"{namespace}::unified_backward")
    def _(grad, img, txt, labels, scale, margin, row_saved, col_saved, anchor_begin, anchor_end, row_chunk, col_chunk):
        return img.new_empty(img.shape), txt.new_empty(txt.shape)

    @torch.library.register_fake(f"{namespace}::quintuplet_forward")
    def _(img, txt, off_img, off_txt, img2, txt2, labels, margin_online, margin_offline, alpha, beta, detach_weights,
          anchor_begin, anchor_end, row_chunk, col_chunk):
        n, acc = img.size(0), _acc_dtype(img.dtype)
        return (img.new_empty((), dtype=acc), img.new_empty(n, 7, dtype=acc), img.new_empty(n, 1, dtype=torch.int64),
                img.new_empty(n, 1, dtype=torch.int64))

    @torch.library.register_fake(f"{namespace}::quintuplet_backward")
    def _(grad, img, txt, off_img, off_txt, img2, txt2, saved, row_index, col_index):
        return tuple(x.new_empty(x.shape) for x in (img, txt, off_img, off_txt, img2, txt2))

    @torch.library.register_fake(f"{namespace}::goal_forward")
    def _(img, txt, labels, triplet_weight, pair_weight, tau, a, b, lam, anchor_begin, anchor_end, row_chunk,
          col_chunk):
        n, acc = img.size(0), _acc_dtype(img.dtype)
        return (img.new_empty((), dtype=acc), img.new_empty(n, 2, dtype=acc), img.new_empty(n, 2, dtype=acc),
                img.new_empty(n, 1, dtype=torch.int64), img.new_empty(n, 1, dtype=torch.int64))

    @torch.library.register_fake(f"{namespace}::goal_backward")
    def _(grad, img, txt, row_saved, col_saved, row_index, col_index):
        return img.new_empty(img.shape), txt.new_empty(txt.shape)

    # Only the loss is differentiable; the saved state and index lists are constants.
    def setup_triplet(ctx, inputs, output):
        img, txt, labels, margin, mining, _k, *anchors_and_chunks = inputs
        _, row_saved, col_saved, row_index, col_index = output
        ctx.mark_non_differentiable(row_saved, col_saved, row_index, col_index)
        ctx.save_for_backward(img, txt, labels, row_saved, col_saved, row_index, col_index)
        ctx.args = (margin, mining, *anchors_and_chunks)

    def backward_triplet(ctx, grad, *_):
        img, txt, labels, row_saved, col_saved, row_index, col_index = ctx.saved_tensors
        margin, mining, *anchors_and_chunks = ctx.args
        grad_img, grad_txt = ops.triplet_backward(grad, img, txt, labels, margin, mining, row_saved, col_saved,
                                                  row_index, col_index, *anchors_and_chunks)
        return grad_img, grad_txt, None, None, None, None, None, None, None, None

    def setup_unified(ctx, inputs, output):
        img, txt, labels, scale, margin, *anchors_and_chunks = inputs
        _, row_saved, col_saved = output
        ctx.mark_non_differentiable(row_saved, col_saved)
        ctx.save_for_backward(img, txt, labels, row_saved, col_saved)
        ctx.args = (scale, margin, *anchors_and_chunks)

    def backward_unified(ctx, grad, *_):
        img, txt, labels, row_saved, col_saved = ctx.saved_tensors
        scale, margin, *anchors_and_chunks = ctx.args
        grad_img, grad_txt = ops.unified_backward(grad, img, txt, labels, scale, margin, row_saved, col_saved,
                                                  *anchors_and_chunks)
        return grad_img, grad_txt, None, None, None, None, None, None, None

    def setup_quintuplet(ctx, inputs, output):
        embeddings = inputs[:6]
        _, saved, row_index, col_index = output
        ctx.mark_non_differentiable(saved, row_index, col_index)
        ctx.save_for_backward(*embeddings, saved, row_index, col_index)

    def backward_quintuplet(ctx, grad, *_):
        grads = ops.quintuplet_backward(grad, *ctx.saved_tensors)
        return (*grads, *[None] * 10)

    # GOAL's backward injects grad times the weights saved in forward (constants), not the
    # derivative of the value.
    def setup_goal(ctx, inputs, output):
        img, txt, *_ = inputs
        _, row_saved, col_saved, row_index, col_index = output
        ctx.mark_non_differentiable(row_saved, col_saved, row_index, col_index)
        ctx.save_for_backward(img, txt, row_saved, col_saved, row_index, col_index)

    def backward_goal(ctx, grad, *_):
        grad_img, grad_txt = ops.goal_backward(grad, *ctx.saved_tensors)
        return grad_img, grad_txt, *[None] * 11

    # The backward ops are not differentiable themselves (mined losses gather through saved
    # indices, GOAL's weights are constants by design, the dense ones write GEMMs in place).
    # Registered so that create_graph=True gives gradients with a grad_fn, and differentiating
    # them raises here, naming the loss, instead of autograd returning None (or failing in
    # an at::mm out= call) with only a warning.
    for backward_op, loss_name in (("triplet_backward", "triplet_loss"), ("unified_backward", "unified_loss"),
                                   ("quintuplet_backward", "quintuplet_loss"), ("goal_backward", "goal_loss")):
        torch.library.register_autograd(f"{namespace}::{backward_op}", _refuse_double_backward(loss_name))

    torch.library.register_autograd(f"{namespace}::triplet_forward", backward_triplet, setup_context=setup_triplet)
    torch.library.register_autograd(f"{namespace}::unified_forward", backward_unified, setup_context=setup_unified)
    torch.library.register_autograd(f"{namespace}::quintuplet_forward", backward_quintuplet,
                                    setup_context=setup_quintuplet)
    torch.library.register_autograd(f"{namespace}::goal_forward", backward_goal, setup_context=setup_goal)


def _refuse_double_backward(loss_name: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"vse_cuda.{loss_name} does not support double backward: its gradient (from "
                           f"torch.autograd.grad(..., create_graph=True)) cannot be differentiated again")
    return backward


_register("vse_cuda")
if "simt" in _lib.backends():
    _register("vse_simt")
