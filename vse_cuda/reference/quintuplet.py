"""AOQ quintuplet loss, spec §3.3 / §3.5."""

from __future__ import annotations

from typing import Optional

import torch

from ._common import REDUCTIONS, _check_choice, _prep, _reduce, _rowdot
from .negatives import hardest_negative, negative_mask


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
