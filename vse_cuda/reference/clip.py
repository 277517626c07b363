"""open_clip's ClipLoss and SigLipLoss (src/open_clip/loss.py of mlfoundations/open_clip), the
formulas written out from that file. ClipLoss: the mean of the two cross-entropies over the logits
γ·img·txtᵀ and γ·txt·imgᵀ with the pairs on the diagonal. Distributed, its ``gather_features``
concatenates every rank's features (with ``gather_with_grad`` through
``torch.distributed.nn.all_gather``, whose backward sums the ranks' gradients); with
``local_loss`` a rank's rows are its own features against all of the other side's, labels
offset by rank·n; without it every rank computes the whole batch's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float, *,
              local_loss: bool = False, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The loss one rank of open_clip's ClipLoss(gather_with_grad=True) returns; one process
    (world_size 1) is the plain symmetric InfoNCE ``(CE(γ I Tᵀ) + CE(γ T Iᵀ)) / 2``."""
    all_image, all_text = image_features, text_features
    if world_size > 1:
        from torch.distributed.nn import all_gather  # differentiable: its backward sums the ranks'

        all_image = torch.cat(all_gather(image_features), dim=0)
        all_text = torch.cat(all_gather(text_features), dim=0)
    if world_size > 1 and local_loss:
        per_image = logit_scale * image_features @ all_text.T
        per_text = logit_scale * text_features @ all_image.T
        labels = torch.arange(per_image.size(0), device=per_image.device) + per_image.size(0) * rank
    else:
        per_image = logit_scale * all_image @ all_text.T
        per_text = per_image.T
        labels = torch.arange(per_image.size(0), device=per_image.device)
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def siglip_rank_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                     logit_bias: torch.Tensor | float, *, world_size: int = 1) -> torch.Tensor:
    """The loss one rank of open_clip's SigLipLoss returns: its own images against every rank's
    texts (open_clip passes the texts around the ranks with autograd; here one differentiable
    all_gather), ``−Σ log σ(z_ij (t·S_ij + b)) / n_local`` with z = +1 only on the rank's own
    pairs. One process: SigLIP's loss over N."""
    n, all_text, offset = image_features.size(0), text_features, 0
    if world_size > 1:
        from torch.distributed import get_rank
        from torch.distributed.nn import all_gather

        all_text = torch.cat(all_gather(text_features), dim=0)
        offset = get_rank() * n
    logits = logit_scale * image_features @ all_text.T + logit_bias
    z = -torch.ones_like(logits)
    z[:, offset:offset + n] += 2 * torch.eye(n, dtype=logits.dtype, device=logits.device)
    return -F.logsigmoid(z * logits).sum() / n
