"""open_clip's ``ClipLoss`` and ``SigLipLoss`` on vse_cuda's chunked kernels: the same
constructors and forwards, the same numbers, no [n, N] logit matrix.

``ClipLoss()(image_features, text_features, logit_scale)`` is open_clip's mean of the two
cross-entropies ``(CE(γ I Tᵀ) + CE(γ T Iᵀ)) / 2`` with γ = ``logit_scale`` (already exp'd, as
open_clip's models return it; a tensor gets its gradient). That is the unified loss at margin 0
(:func:`vse_cuda.unified_loss`, symmetric InfoNCE) divided by 2n.

Distributed (``world_size > 1``, the default process group, ``rank`` and ``world_size`` as
open_clip takes them), with ``gather_with_grad=True``:

* ``local_loss=True``: each rank's loss covers its own images and captions against every rank's
  (labels offset by rank·n in open_clip) — exactly ``unified_loss(group=WORLD)`` over 2·n_local.
* ``local_loss=False``: every rank returns the whole batch's loss, and its features receive
  ``world_size`` times that loss's gradient (open_clip's all_gather sums every rank's copy of the
  same loss; DDP's averaging then divides it out). Here each rank computes its own anchors'
  part, the ranks' parts are summed for the value, and the gradient is scaled to match.

``gather_with_grad=False`` with several ranks drops the gradient that reaches a rank's features
through the other ranks' terms (and, with ``local_loss``, a rank's own terms in the other
direction); vse_cuda's exchange is exact, so that variant is refused rather than approximated.
Horovod is not supported.

``SigLipLoss()(image_features, text_features, logit_scale, logit_bias)`` is open_clip's
``−Σ_ij log σ(z_ij (t·S_ij + b)) / n`` (:func:`vse_cuda.siglip_loss`). Distributed, open_clip
passes the text features around the ranks (``dist_impl`` bidir / shift / reduce / gather, all
the same numbers) and each rank returns its own images' terms against every rank's texts over
its n; so does vse_cuda's exchange (a gather of both sides), with the same gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..ops.siglip import siglip_loss
from ..ops.unified import unified_loss

__all__ = ["ClipLoss", "SigLipLoss"]


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` (src/open_clip/loss.py) with vse_cuda's fused unified loss inside.

    Args: as open_clip's. ``cache_labels`` has no effect (no label tensor is built).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("vse_cuda.contrib.open_clip.ClipLoss: horovod is not supported; "
                                      "use torch.distributed")
        _check_rank("ClipLoss", rank, world_size)
        if world_size > 1 and not gather_with_grad:
            raise NotImplementedError(
                "ClipLoss(gather_with_grad=False) with world_size > 1 drops the gradient through the other ranks' "
                "features; vse_cuda's distributed loss is exact: pass gather_with_grad=True")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size = rank, world_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | None = None, output_dict: bool = False):
        """``logit_bias`` shifts every logit of a row alike, which no softmax sees: accepted for
        open_clip's call signature, it changes neither the loss nor any gradient."""
        group = self._group()
        n = image_features.size(0)
        total = unified_loss(image_features, text_features, scale=logit_scale, margin=0.0, group=group)
        if group is None or self.local_loss:
            loss = total / (2 * n)
        else:
            whole = total.detach().clone()
            dist.all_reduce(whole, group=group)
            n_all = n * self.world_size
            scaled = total * self.world_size
            loss = (scaled + (whole - scaled).detach()) / (2 * n_all)
        return {"contrastive_loss": loss} if output_dict else loss

    def _group(self):
        return _world_group("ClipLoss", self.rank, self.world_size)


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss`` (src/open_clip/loss.py) with vse_cuda's fused SigLIP loss inside.

    Args: as open_clip's (``dist_impl`` of open_clip 3, ``bidir`` of earlier releases: any
    exchange gives the same numbers). ``cache_labels`` has no effect.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 bidir: bool = True, use_horovod: bool = False):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("vse_cuda.contrib.open_clip.SigLipLoss: horovod is not supported; "
                                      "use torch.distributed")
        if dist_impl not in (None, "bidir", "shift", "reduce", "gather"):
            raise ValueError(f"SigLipLoss: dist_impl must be bidir, shift, reduce, gather or None, got {dist_impl!r}")
        _check_rank("SigLipLoss", rank, world_size)
        self.cache_labels, self.rank, self.world_size, self.dist_impl, self.bidir = (
            cache_labels, rank, world_size, dist_impl, bidir)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float, output_dict: bool = False):
        group = _world_group("SigLipLoss", self.rank, self.world_size)
        total = siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction="sum", group=group)
        loss = total / image_features.size(0)
        return {"contrastive_loss": loss} if output_dict else loss


def _check_rank(name: str, rank: object, world_size: object) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"{name}: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _world_group(name: str, rank: int, world_size: int):
    """None for one process, else the default group, which must have this rank and size."""
    if world_size == 1:
        return None
    if not dist.is_initialized() or dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(f"{name}(rank={rank}, world_size={world_size}) needs the default process group with that "
                         f"rank and size")
    return dist.group.WORLD
