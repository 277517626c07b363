"""Reference oracle for vse_cuda: plain, materialized PyTorch written from spec/losses.md.

This module is the ground truth the fused CPU/CUDA kernels are tested against and the
"eager" baseline in the benchmarks. The product path never calls it. It favours clarity over
speed: every loss materializes the full N x N similarity matrix S and the masks it needs.
It imports only torch (and math/typing) so that tests can load it standalone from its path.

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

Building blocks exported for other tests: :func:`negative_mask`, :func:`hardest_negative`,
:func:`rank_candidates`, :func:`topk_negatives`, :func:`triplet_loss_from_similarity`,
:func:`unified_loss_from_similarity`, :func:`quintuplet_loss_from_scores`,
:func:`goal_weights`, :func:`goal_value_and_grad`, :func:`goal_loss_from_similarity`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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
    "quintuplet_loss_from_scores",
    "quintuplet_loss",
    "goal_weights",
    "goal_value_and_grad",
    "goal_loss_from_similarity",
    "goal_loss",
]

MINING_MODES = ("all", "hardest", "topk")
REDUCTIONS = ("sum", "mean")
TRIPLET_WEIGHTS = ("con", "nca", "cir")
PAIR_WEIGHTS = ("con", "lin", "sig", "lin_ms", "sig_ms")

# Offsets of GOAL's relative-similarity sets (spec §5.2).
GOAL_MS_POS_OFFSET = 0.1
GOAL_MS_NEG_OFFSET = 0.1


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def _check_choice(name: str, value: str, choices: Tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the oracle computes in: float32 for float16/bfloat16, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _prep(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Upcast half types to float32, then optionally L2-normalize rows (F.normalize, eps 1e-12)."""
    x = x.to(compute_dtype(x.dtype))
    if normalize:
        x = F.normalize(x, dim=1)
    return x


def _reduce(total: torch.Tensor, n: int, reduction: str) -> torch.Tensor:
    """``"sum"``: total; ``"mean"``: total / n."""
    _check_choice("reduction", reduction, REDUCTIONS)
    return total / n if reduction == "mean" else total


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products s_i = <a_i, b_i> (length N)."""
    return (a * b).sum(dim=1)


# --------------------------------------------------------------------------------------------
# masks and mining
# --------------------------------------------------------------------------------------------

def negative_mask(n: int, labels: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Bool N x N mask of valid negatives.

    ``mask[i, j] = (j != i) and (labels is None or labels[i] != labels[j])``.
    Symmetric, so it serves rows (i2t anchors) and columns (t2i anchors) alike.
    """
    if device is None and labels is not None:
        device = labels.device
    mask = ~torch.eye(n, dtype=torch.bool, device=device)
    if labels is not None:
        labels = labels.to(device)
        mask &= labels[:, None] != labels[None, :]
    return mask


def hardest_negative(S: torch.Tensor, valid: torch.Tensor):
    """Row-wise hardest valid entry: ``c(i) = argmax_{j : valid[i, j]} S[i, j]``.

    Ties go to the lowest index; NaN ranks above every number (the first NaN wins).
    Returns ``(values, indices, has)``: ``values[i] = S[i, c(i)]`` (differentiable, gathered
    from S), ``indices`` int64, ``has[i]`` = row i has at least one valid entry. Rows with no
    valid entry get index 0 and ``has = False``; callers must mask them out.
    For the column direction (t2i) call it on ``S.T, valid.T``.
    """
    n, m = S.shape
    with torch.no_grad():
        has = valid.any(dim=1)
        filled = S.detach().masked_fill(~valid, float("-inf"))
        best = filled.amax(dim=1, keepdim=True)  # NaN propagates: a NaN row maximum is NaN
        hit = valid & ((filled == best) | (torch.isnan(filled) & torch.isnan(best)))
        cols = torch.arange(m, device=S.device).expand(n, m)
        idx = torch.where(hit, cols, torch.full_like(cols, m)).amin(dim=1)
        idx = torch.where(has, idx, torch.zeros_like(idx))
    values = S.gather(1, idx[:, None]).squeeze(1)
    return values, idx, has


def rank_candidates(S: torch.Tensor, valid: torch.Tensor):
    """Per row, all column indices ordered: valid before invalid; among valid ones by value
    descending (NaN first), ties by lowest index.

    Returns ``(order [N, M] int64, count [N] int64)`` where ``count[i]`` is the number of valid
    entries of row i, i.e. ``order[i, :count[i]]`` are the valid candidates in rank order.
    Two stable sorts: by value (descending), then by validity (valid first).
    """
    with torch.no_grad():
        order = torch.sort(S.detach(), dim=1, descending=True, stable=True).indices
        v = valid.gather(1, order).to(torch.int8)
        order = order.gather(1, torch.sort(v, dim=1, descending=True, stable=True).indices)
        count = valid.sum(dim=1)
    return order, count


def topk_negatives(S: torch.Tensor, valid: torch.Tensor, k: int):
    """The k highest valid entries of every row (see :func:`rank_candidates` for the order).

    Returns ``(values [N, kk], indices [N, kk], slot_valid [N, kk])`` with ``kk = min(k, M)``;
    ``values`` are gathered from S (differentiable); ``slot_valid[i, s] = s < count[i]``.
    Slots past a row's count hold arbitrary (invalid) columns and must be masked by the caller.
    """
    order, count = rank_candidates(S, valid)
    kk = min(int(k), S.shape[1])
    idx = order[:, :kk]
    slot_valid = torch.arange(kk, device=S.device)[None, :] < count[:, None]
    return S.gather(1, idx), idx, slot_valid


# --------------------------------------------------------------------------------------------
# similarity and retrieval
# --------------------------------------------------------------------------------------------

def similarity(a: torch.Tensor, b: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """``S = a @ b.T`` (N x M); with ``normalize`` both are L2-normalized row-wise first.

    Computed in :func:`compute_dtype` and returned in ``a.dtype``.
    """
    out_dtype = a.dtype
    return (_prep(a, normalize) @ _prep(b, normalize).T).to(out_dtype)


def topk_similar(queries: torch.Tensor, keys: torch.Tensor, k: int, *, normalize: bool = False,
                 query_labels: Optional[torch.Tensor] = None,
                 key_labels: Optional[torch.Tensor] = None):
    """Top-k keys for every query by inner product ``S = queries @ keys.T``.

    Key j is excluded for query i when both label vectors are given and
    ``key_labels[j] == query_labels[i]`` (e.g. an image's own captions). There is no implicit
    diagonal exclusion (queries and keys are different sets).
    Order: value descending, ties by lowest key index, NaN above every number.
    Returns ``(values [N, k] in queries.dtype, indices [N, k] int64)``. The ranking is done on
    the compute-dtype (float32 for half inputs) scores. If a query has fewer than k eligible
    keys (k > M, or label exclusion), the missing slots hold value ``-inf`` and index ``-1``.
    Giving exactly one of ``query_labels``/``key_labels`` raises ValueError.
    """
    if (query_labels is None) != (key_labels is None):
        raise ValueError("query_labels and key_labels must be given together")
    out_dtype = queries.dtype
    S = _prep(queries, normalize) @ _prep(keys, normalize).T
    n, m = S.shape
    if query_labels is None:
        valid = torch.ones(n, m, dtype=torch.bool, device=S.device)
    else:
        valid = query_labels.to(S.device)[:, None] != key_labels.to(S.device)[None, :]
    order, count = rank_candidates(S, valid)
    values = torch.full((n, k), float("-inf"), dtype=S.dtype, device=S.device)
    indices = torch.full((n, k), -1, dtype=torch.int64, device=S.device)
    kk = min(int(k), m)
    slot_valid = torch.arange(kk, device=S.device)[None, :] < count[:, None]
    idx = order[:, :kk]
    values[:, :kk] = torch.where(slot_valid, S.gather(1, idx), values[:, :kk])
    indices[:, :kk] = torch.where(slot_valid, idx, indices[:, :kk])
    return values.to(out_dtype), indices


# --------------------------------------------------------------------------------------------
# triplet (VSE0 / VSE++ / top-k), spec §2
# --------------------------------------------------------------------------------------------

def _triplet_direction(S: torch.Tensor, valid: torch.Tensor, margin: float, mining: str,
                       k: int) -> torch.Tensor:
    """Sum over anchors (rows of S, positive on the diagonal) of the mined hinge terms."""
    P = S.diagonal()
    if mining == "all":
        hinge = torch.relu(margin + S - P[:, None])
        return torch.where(valid, hinge, torch.zeros_like(hinge)).sum()
    if mining == "hardest":
        u, _, has = hardest_negative(S, valid)
        hinge = torch.relu(margin + u - P)
        return torch.where(has, hinge, torch.zeros_like(hinge)).sum()
    # topk: mean of the hinges of the (up to) k hardest valid negatives
    vals, _, slot_valid = topk_negatives(S, valid, k)
    hinge = torch.relu(margin + vals - P[:, None])
    hinge = torch.where(slot_valid, hinge, torch.zeros_like(hinge))
    count = slot_valid.sum(dim=1).clamp_min(1).to(S.dtype)
    return (hinge.sum(dim=1) / count).sum()


def triplet_loss_from_similarity(S: torch.Tensor, *, margin: float = 0.2, mining: str = "hardest",
                                 k: int = 1, labels: Optional[torch.Tensor] = None,
                                 reduction: str = "sum") -> torch.Tensor:
    """Triplet loss of a square similarity matrix S (no casting; S's dtype is the compute dtype).

    With ``h_ij = [m + S_ij - S_ii]_+`` (i2t, rows) and ``g_ij = [m + S_ij - S_jj]_+`` (t2i,
    columns) and V the valid-negative mask (:func:`negative_mask`):

    * ``"all"`` (VSE0, spec L_SH): ``L = sum_{V_ij} h_ij + sum_{V_ij} g_ij``.
    * ``"hardest"`` (VSE++, spec L_MH): ``L = sum_i [m + S_{i,c(i)} - S_ii]_+
      + sum_j [m + S_{r(j),j} - S_jj]_+``, c(i)/r(j) the hardest valid negative of row i /
      column j (lowest index on ties).
    * ``"topk"``: per anchor the mean of the hinges of its k hardest valid negatives (over
      ``min(k, #valid)`` of them); both directions summed. k = 1 equals ``"hardest"``.

    ``k`` is ignored unless ``mining == "topk"``. Anchors without a valid negative add 0.
    The hinge is ``relu``, whose derivative at exactly 0 is 0 (indicator ``1[. > 0]``).
    """
    _check_choice("mining", mining, MINING_MODES)
    _check_choice("reduction", reduction, REDUCTIONS)
    n = S.shape[0]
    valid = negative_mask(n, labels, S.device)
    total = (_triplet_direction(S, valid, margin, mining, k)
             + _triplet_direction(S.T, valid.T, margin, mining, k))
    return _reduce(total, n, reduction)


def triplet_loss(img: torch.Tensor, txt: torch.Tensor, *, margin: float = 0.2,
                 mining: str = "hardest", k: int = 1, labels: Optional[torch.Tensor] = None,
                 normalize: bool = False, reduction: str = "sum") -> torch.Tensor:
    """VSE triplet loss on ``S = img @ txt.T``; see :func:`triplet_loss_from_similarity`.

    Returns a 0-dim tensor in ``img.dtype``.
    """
    _check_choice("mining", mining, MINING_MODES)
    _check_choice("reduction", reduction, REDUCTIONS)
    out_dtype = img.dtype
    S = _prep(img, normalize) @ _prep(txt, normalize).T
    loss = triplet_loss_from_similarity(S, margin=margin, mining=mining, k=k, labels=labels,
                                        reduction=reduction)
    return loss.to(out_dtype)


# --------------------------------------------------------------------------------------------
# unified loss, spec §4.2
# --------------------------------------------------------------------------------------------

def _unified_direction(S: torch.Tensor, valid: torch.Tensor, scale: float,
                       margin: float) -> torch.Tensor:
    """sum_i logsumexp({0} U {scale * (S_ij - S_ii + margin) : valid_ij}) over rows of S."""
    P = S.diagonal()
    z = scale * (S - P[:, None] + margin)
    z = z.masked_fill(~valid, float("-inf"))
    zero = torch.zeros(S.shape[0], 1, dtype=S.dtype, device=S.device)
    return torch.logsumexp(torch.cat([zero, z], dim=1), dim=1).sum()


def unified_loss_from_similarity(S: torch.Tensor, *, scale: float = 20.0, margin: float = 0.2,
                                 labels: Optional[torch.Tensor] = None,
                                 reduction: str = "sum") -> torch.Tensor:
    """Unified pair-similarity loss of a square S (spec §4.2, no 1/gamma prefactor).

    ``L = sum_i log(1 + sum_{valid j} exp(g (S_ij - S_ii + m)))
        + sum_j log(1 + sum_{valid i} exp(g (S_ij - S_jj + m)))``, g = ``scale``.
    Each log is a log-sum-exp that includes the constant 0 term (stable for g = 1000).
    m = 0, g = 1/tau is symmetric InfoNCE; (1/g) L -> hardest triplet as g -> inf.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    n = S.shape[0]
    valid = negative_mask(n, labels, S.device)
    total = (_unified_direction(S, valid, scale, margin)
             + _unified_direction(S.T, valid.T, scale, margin))
    return _reduce(total, n, reduction)


def unified_loss(img: torch.Tensor, txt: torch.Tensor, *, scale: float = 20.0,
                 margin: float = 0.2, labels: Optional[torch.Tensor] = None,
                 normalize: bool = False, reduction: str = "sum") -> torch.Tensor:
    """Unified loss on ``S = img @ txt.T``; see :func:`unified_loss_from_similarity`.

    Returns a 0-dim tensor in ``img.dtype``.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    out_dtype = img.dtype
    S = _prep(img, normalize) @ _prep(txt, normalize).T
    loss = unified_loss_from_similarity(S, scale=scale, margin=margin, labels=labels,
                                        reduction=reduction)
    return loss.to(out_dtype)


# --------------------------------------------------------------------------------------------
# AOQ quintuplet loss, spec §3.3 / §3.5
# --------------------------------------------------------------------------------------------

def quintuplet_loss_from_scores(S: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                                q: torch.Tensor, z: torch.Tensor, *, margin_online: float = 0.2,
                                margin_offline: float = 0.0, alpha: float = 0.3,
                                beta: float = 1.5, detach_weights: bool = False,
                                labels: Optional[torch.Tensor] = None,
                                reduction: str = "sum") -> torch.Tensor:
    """Six-term AOQ loss from the in-batch S and the four offline score vectors.

    p = diag(S); u_i = S_{i,c(i)} (hardest valid negative of row i), w_i = S_{r(i),i}
    (hardest valid negative of column i); x_i = <img_i, off_txt_i>, y_i = <off_img_i, txt_i>,
    q_i = <off_img_i, off_txt_i>, z_i = <img2_i, txt2_i>.
    ``omega = beta - (x - u)/alpha``, ``nu = beta - (y - w)/alpha`` (unclamped; may be < 0).

    ``L = sum_i { omega_i [m1 + u_i - p_i]_+ + nu_i [m1 + w_i - p_i]_+
                + [m2 + x_i - p_i]_+ + [m2 + y_i - p_i]_+ + [m2 + q_i - p_i]_+
                + [m2 + z_i - p_i]_+ }``

    ``detach_weights=False`` (official code) lets the gradient flow through omega and nu
    (spec §3.5 bold terms); True treats them as constants. An anchor with no valid in-batch
    negative has its online term (of that direction) equal to 0 with no gradient through its
    weight; the four offline terms always count.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    n = S.shape[0]
    valid = negative_mask(n, labels, S.device)
    p = S.diagonal()
    u, _, has_u = hardest_negative(S, valid)
    w, _, has_w = hardest_negative(S.T, valid.T)
    omega = beta - (x - u) / alpha
    nu = beta - (y - w) / alpha
    if detach_weights:
        omega, nu = omega.detach(), nu.detach()
    zero = torch.zeros_like(p)
    online = (torch.where(has_u, omega * torch.relu(margin_online + u - p), zero)
              + torch.where(has_w, nu * torch.relu(margin_online + w - p), zero))
    offline = (torch.relu(margin_offline + x - p) + torch.relu(margin_offline + y - p)
               + torch.relu(margin_offline + q - p) + torch.relu(margin_offline + z - p))
    return _reduce((online + offline).sum(), n, reduction)


def quintuplet_loss(img: torch.Tensor, txt: torch.Tensor, off_img: torch.Tensor,
                    off_txt: torch.Tensor, img2: torch.Tensor, txt2: torch.Tensor, *,
                    margin_online: float = 0.2, margin_offline: float = 0.0,
                    alpha: float = 0.3, beta: float = 1.5, detach_weights: bool = False,
                    labels: Optional[torch.Tensor] = None, normalize: bool = False,
                    reduction: str = "sum") -> torch.Tensor:
    """AOQ adaptive offline quintuplet loss (spec §3.3).

    ``S = img @ txt.T``; x = rowdot(img, off_txt), y = rowdot(off_img, txt),
    q = rowdot(off_img, off_txt), z = rowdot(img2, txt2); see
    :func:`quintuplet_loss_from_scores` for the formula. ``normalize`` normalizes all six
    inputs. ``labels`` only masks the in-batch (online) negatives. Returns ``img.dtype``.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    out_dtype = img.dtype
    v, t, vo, to, v2, t2 = (_prep(e, normalize) for e in (img, txt, off_img, off_txt, img2, txt2))
    S = v @ t.T
    loss = quintuplet_loss_from_scores(
        S, _rowdot(v, to), _rowdot(vo, t), _rowdot(vo, to), _rowdot(v2, t2),
        margin_online=margin_online, margin_offline=margin_offline, alpha=alpha, beta=beta,
        detach_weights=detach_weights, labels=labels, reduction=reduction)
    return loss.to(out_dtype)


# --------------------------------------------------------------------------------------------
# GOAL, spec §5
# --------------------------------------------------------------------------------------------

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
