"""GOAL, spec §5."""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._common import REDUCTIONS, _check_choice, _prep
from .negatives import hardest_negative, negative_mask

TRIPLET_WEIGHTS = ("con", "nca", "cir")
PAIR_WEIGHTS = ("con", "lin", "sig", "lin_ms", "sig_ms")

# Offsets of GOAL's relative-similarity sets (spec §5.2).
GOAL_MS_POS_OFFSET = 0.1
GOAL_MS_NEG_OFFSET = 0.1


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise mean of ``values`` over ``mask``; 0 for rows with an empty mask."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=1)
    count = mask.sum(dim=1)
    return torch.where(count > 0, total / count.clamp_min(1).to(values.dtype),
                       torch.zeros_like(total))


def goal_weights(S: torch.Tensor, valid: torch.Tensor, *, triplet_weight: str = "con",
                 pair_weight: str = "con", tau: float = 1.0, a: float = 2.0, b: float = 10.0,
                 lam: float = 0.5):
    """GOAL weights for the anchors = rows of S (positive on the diagonal); spec §5.2.

    P_i = S_ii, N_i = S_{i,c(i)} with c(i) the hardest valid negative (lowest index on ties).
    Triplet weight w_t: con 1; nca sigmoid(tau (N - P)); cir sigmoid(tau ((1-P)^2 + N^2 - 0.5)).
    Pair weights (w_p, w_n):
      con (1, 1); lin (1 - P, N);
      sig (1/(exp(a(P-lam)) + 1), 1/(exp(-b(N-lam)) + 1));
      sig_ms (1/(exp(a(P-lam)) + R+), 1/(exp(-b(N-lam)) + R-)),
          R+_i = mean_{k in Pset_i} exp(a(P_i - P_k)), R-_i = mean_{j in Nset_i} exp(b(S_ij - N_i));
      lin_ms ((1 - R+_i)(1 - P), (1 + R-_i) N),
          R+_i = mean_{k in Pset_i} (P_i - P_k), R-_i = mean_{j in Nset_i} (N_i - S_ij);
      Pset_i = {k != i : P_k <= N_i + 0.1};
      Nset_i = {j : valid_ij, j != c(i), S_ij >= min_k P_k - 0.1} (valid excludes j = i and,
      with labels, same-label j). Empty set -> R = 0 (mean, not sum; no MS "+1" self term).
    For the t2i direction call it on ``S.T, valid.T``.
    Returns ``(w_t, w_p, w_n, P, N, c, has)``, all length-N (c int64, has bool); computed
    without autograd (the weights are constants).
    """
    _check_choice("triplet_weight", triplet_weight, TRIPLET_WEIGHTS)
    _check_choice("pair_weight", pair_weight, PAIR_WEIGHTS)
    with torch.no_grad():
        S = S.detach()
        P = S.diagonal()
        Nv, c, has = hardest_negative(S, valid)
        one = torch.ones_like(P)

        if triplet_weight == "con":
            wt = one
        elif triplet_weight == "nca":
            wt = torch.sigmoid(tau * (Nv - P))
        else:  # cir
            wt = torch.sigmoid(tau * ((1 - P) ** 2 + Nv ** 2 - 0.5))

        if pair_weight in ("lin_ms", "sig_ms"):
            n = S.shape[0]
            not_self = ~torch.eye(n, dtype=torch.bool, device=S.device)
            pset = not_self & (P[None, :] <= Nv[:, None] + GOAL_MS_POS_OFFSET)
            is_c = torch.zeros_like(valid)
            is_c[torch.arange(n, device=S.device), c] = True
            nset = valid & ~is_c & (S >= P.min() - GOAL_MS_NEG_OFFSET)
            dP = P[:, None] - P[None, :]      # [i, k] = P_i - P_k
            dN = S - Nv[:, None]              # [i, j] = S_ij - N_i

        if pair_weight == "con":
            wp, wn = one, one
        elif pair_weight == "lin":
            wp, wn = 1 - P, Nv
        elif pair_weight == "sig":
            wp = 1 / (torch.exp(a * (P - lam)) + 1)
            wn = 1 / (torch.exp(-b * (Nv - lam)) + 1)
        elif pair_weight == "sig_ms":
            rp = _masked_mean(torch.exp(a * dP), pset)
            rn = _masked_mean(torch.exp(b * dN), nset)
            wp = 1 / (torch.exp(a * (P - lam)) + rp)
            wn = 1 / (torch.exp(-b * (Nv - lam)) + rn)
        else:  # lin_ms
            rp = _masked_mean(dP, pset)
            rn = _masked_mean(-dN, nset)
            wp = (1 - rp) * (1 - P)
            wn = (1 + rn) * Nv
    return wt, wp, wn, P, Nv, c, has


def goal_value_and_grad(S: torch.Tensor, *, triplet_weight: str = "con", pair_weight: str = "con",
                        tau: float = 1.0, a: float = 2.0, b: float = 10.0, lam: float = 0.5,
                        labels: Optional[torch.Tensor] = None, reduction: str = "sum"):
    """GOAL logging value and injected gradient G = dL/dS for a square S (spec §5.1).

    value = sum over anchors with a valid negative, both directions, of (N - P).
    G: for every i2t anchor i with a valid negative, ``G_ii -= w_t w_p``,
    ``G_{i,c(i)} += w_t w_n`` (weights at (P_i, N_i) from :func:`goal_weights` on S); for
    every t2i anchor j, ``G_jj -= w_t w_p``, ``G_{r(j),j} += w_t w_n`` (weights from S.T).
    ``reduction="mean"`` divides value and G by N. No autograd; returns ``(value, G)``.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    with torch.no_grad():
        S = S.detach()
        n = S.shape[0]
        valid = negative_mask(n, labels, S.device)
        value = S.new_zeros(())
        G = torch.zeros_like(S)
        for Sd, vd, transpose in ((S, valid, False), (S.T, valid.T, True)):
            wt, wp, wn, P, Nv, c, has = goal_weights(
                Sd, vd, triplet_weight=triplet_weight, pair_weight=pair_weight,
                tau=tau, a=a, b=b, lam=lam)
            zero = torch.zeros_like(P)
            value = value + torch.where(has, Nv - P, zero).sum()
            gd = torch.zeros_like(S)
            gd.scatter_(1, c[:, None], torch.where(has, wt * wn, zero)[:, None])
            gd.diagonal().sub_(torch.where(has, wt * wp, zero))
            G += gd.T if transpose else gd
        if reduction == "mean":
            value, G = value / n, G / n
    return value, G


class _GoalFunction(torch.autograd.Function):
    """forward(S) -> GOAL value; backward injects G * grad_output (weights are constants)."""

    @staticmethod
    def forward(ctx, S, labels, triplet_weight, pair_weight, tau, a, b, lam, reduction):
        value, G = goal_value_and_grad(S, triplet_weight=triplet_weight,
                                       pair_weight=pair_weight, tau=tau, a=a, b=b, lam=lam,
                                       labels=labels, reduction=reduction)
        ctx.save_for_backward(G)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (G,) = ctx.saved_tensors
        return (G * grad_output.to(G.dtype),) + (None,) * 8


def goal_loss_from_similarity(S: torch.Tensor, *, triplet_weight: str = "con",
                              pair_weight: str = "con", tau: float = 1.0, a: float = 2.0,
                              b: float = 10.0, lam: float = 0.5,
                              labels: Optional[torch.Tensor] = None,
                              reduction: str = "sum") -> torch.Tensor:
    """GOAL on a square S through an autograd Function: the value of
    :func:`goal_value_and_grad`, and ``dS = G * grad_output`` in backward (not the autograd
    gradient of the value)."""
    _check_choice("triplet_weight", triplet_weight, TRIPLET_WEIGHTS)
    _check_choice("pair_weight", pair_weight, PAIR_WEIGHTS)
    _check_choice("reduction", reduction, REDUCTIONS)
    return _GoalFunction.apply(S, labels, triplet_weight, pair_weight, float(tau), float(a),
                               float(b), float(lam), reduction)


def goal_loss(img: torch.Tensor, txt: torch.Tensor, *, triplet_weight: str = "con",
              pair_weight: str = "con", tau: float = 1.0, a: float = 2.0, b: float = 10.0,
              lam: float = 0.5, labels: Optional[torch.Tensor] = None, normalize: bool = False,
              reduction: str = "sum") -> torch.Tensor:
    """GOAL (spec §5) on ``S = img @ txt.T``: forward = sum over both directions of
    (N - P) for anchors with a valid (hardest, no margin) negative; backward injects the
    weighted G of :func:`goal_value_and_grad` times grad_output, which autograd takes through
    ``S = img @ txt.T`` and the normalization. Returns ``img.dtype``.
    """
    _check_choice("triplet_weight", triplet_weight, TRIPLET_WEIGHTS)
    _check_choice("pair_weight", pair_weight, PAIR_WEIGHTS)
    _check_choice("reduction", reduction, REDUCTIONS)
    out_dtype = img.dtype
    S = _prep(img, normalize) @ _prep(txt, normalize).T
    loss = goal_loss_from_similarity(S, triplet_weight=triplet_weight, pair_weight=pair_weight,
                                     tau=tau, a=a, b=b, lam=lam, labels=labels,
                                     reduction=reduction)
    return loss.to(out_dtype)
