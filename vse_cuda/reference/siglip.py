"""SigLIP's sigmoid loss, spec §8.2 (Zhai et al., ICCV 2023; open_clip's SigLipLoss divides the
sum by N, our ``reduction="mean"``)."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ._common import REDUCTIONS, _check_choice, _prep, _reduce

Scalar = Union[float, torch.Tensor]


def siglip_loss_from_similarity(S: torch.Tensor, scale: Scalar, bias: Scalar, *,
                                labels: Optional[torch.Tensor] = None,
                                reduction: str = "mean") -> torch.Tensor:
    """``L = -sum_ij log sigmoid(z_ij (scale * S_ij + bias))`` over a square S, z_ij = +1 on the
    diagonal and, with ``labels``, wherever labels_i == labels_j, else -1."""
    _check_choice("reduction", reduction, REDUCTIONS)
    n = S.shape[0]
    positive = torch.eye(n, dtype=torch.bool, device=S.device)
    if labels is not None:
        labels = labels.to(S.device)
        positive = positive | (labels[:, None] == labels[None, :])
    z = positive.to(S.dtype) * 2 - 1
    return _reduce(-F.logsigmoid(z * (scale * S + bias)).sum(), n, reduction)


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, scale: Scalar, bias: Scalar, *,
                labels: Optional[torch.Tensor] = None, normalize: bool = False,
                reduction: str = "mean") -> torch.Tensor:
    """SigLIP loss on ``S = img @ txt.T``; see :func:`siglip_loss_from_similarity`.
    Returns a 0-dim tensor in ``img.dtype``."""
    out_dtype = img.dtype
    S = _prep(img, normalize) @ _prep(txt, normalize).T
    return siglip_loss_from_similarity(S, scale, bias, labels=labels, reduction=reduction).to(out_dtype)
