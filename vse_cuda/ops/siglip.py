"""SigLIP's sigmoid loss (spec §8.2): one binary term per pair of the batch.

Its pieces, by name: csrc/common/siglip.h (each row's sum of its terms),
csrc/common/siglip_op.h (siglip_forward / siglip_backward on the engine),
csrc/cpu/siglip.cpp, csrc/cuda/siglip.cu, the schemas in csrc/ops.cpp; tested by
python_tests/test_siglip.py; benchmarked by benchmarks/bench_losses.py (variant siglip).
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_labels, check_scalar_tensor
from . import _engine

__all__ = ["SigLipLoss", "siglip_loss"]

Scalar = float | torch.Tensor


def _check_options(scale, bias, normalize, reduction, group, chunk_size, device=None, names=("scale", "bias")):
    """siglip_loss's options, checked (per call, or at SigLipLoss's construction, where the
    inputs' device is not known yet and the first two are named ``names``); tensors stay tensors."""
    scale = check_scalar_tensor(names[0], scale, device=device, positive=True)
    bias = check_scalar_tensor(names[1], bias, device=device)
    normalize, reduction, group, chunk_size = _engine.check_engine_options(normalize, reduction, group, chunk_size)
    return scale, bias, normalize, reduction, group, chunk_size


def siglip_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: Scalar,
    bias: Scalar,
    *,
    labels: torch.Tensor | None = None,
    normalize: bool = False,
    reduction: str = "mean",
    group=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of the paired batch on S = img·txtᵀ (Zhai et al. 2023).

    ``L = −Σ_ij log σ(z_ij (t·S_ij + b)) = Σ_ij softplus(−z_ij (t·S_ij + b))``

    with t = ``scale``, b = ``bias`` and z_ij = +1 for the pairs (i, i) and, with ``labels``,
    every pair (i, j) with ``labels[i] == labels[j]``, else −1. Each term is evaluated stably
    (softplus from e^{−|x|}). The N×N logits are never stored: each row keeps the sum of its
    terms (O(N) state), and the backward recomputes S tile by tile.

    Gradients with respect to img, txt and, when they are tensors that require grad, t and b:
    ``∂L/∂t = Σ_ij S_ij ∂L/∂u_ij``, ``∂L/∂b = Σ_ij ∂L/∂u_ij`` with ``∂L/∂u_ij = −z_ij σ(−z_ij u_ij)``,
    accumulated in the forward's sweep. SigLIP learns t = exp(t′) (t′ initialised at log 10) and
    b (initialised at −10): pass ``scale=t_prime.exp()``.

    Args:
        img, txt: [N, D] float16/bfloat16/float32/float64 embeddings, same dtype and device
            (half types are computed in float32; loss and gradients in the input dtype).
        scale: t > 0, a number or a 0-dim floating tensor on the CPU or the inputs' device.
        bias: b, a finite number or a 0-dim floating tensor (same rule).
        labels: optional int64 [N] image ids: same-label pairs are positives (z = +1).
        normalize: L2-normalize img and txt first (``F.normalize``).
        reduction: "mean" (sum / N, open_clip's SigLipLoss; the default) or "sum".
        group: a ``torch.distributed`` process group: every rank's pairs enter, each rank's
            loss holds the terms of its own rows (its images against every rank's captions), so
            the sum over ranks is the loss of the concatenated batch, gradients included (see
            :mod:`vse_cuda.distributed`).
        chunk_size: rows of S per chunk (default: from the memory budget).

    Returns:
        0-dim tensor in ``img.dtype``.
    """
    n = _engine.check_pair(img, txt, group=group)
    scale, bias, normalize, reduction, group, chunk_size = _check_options(
        scale, bias, normalize, reduction, group, chunk_size, img.device)
    labels = check_labels("labels", labels, n, img.device)
    batch = _engine.gather((img, txt), labels, group, normalize, chunk_size)
    scale, bias = _engine.scalar_tensor(scale), _engine.scalar_tensor(bias)
    total = batch.ops.siglip_forward(*batch.embeddings, batch.labels, scale, bias, *batch.tiles)[0]
    return batch.reduce(total, reduction)


class SigLipLoss(nn.Module):
    """:func:`siglip_loss` as a module, with SigLIP's learnable temperature and bias as its
    parameters: t = exp(``log_scale``) and b = ``bias``, initialised at log 10 and −10 as in the
    paper (``learnable=False`` keeps them fixed buffers). ``forward(img, txt, labels=None,
    scale=None, bias=None)``: a scale or bias given there replaces the module's for that call
    (e.g. a model's own ``logit_scale.exp()`` and ``logit_bias``)."""

    def __init__(self, *, init_scale: float = 10.0, init_bias: float = -10.0, learnable: bool = True,
                 normalize: bool = False, reduction: str = "mean", group=None, chunk_size: int | None = None):
        super().__init__()
        init_scale, init_bias, self.normalize, self.reduction, self.group, self.chunk_size = _check_options(
            init_scale, init_bias, normalize, reduction, group, chunk_size, names=("init_scale", "init_bias"))
        log_scale = torch.tensor(float(init_scale)).log()
        bias = torch.tensor(float(init_bias))
        if learnable:
            self.log_scale, self.bias = nn.Parameter(log_scale), nn.Parameter(bias)
        else:
            self.register_buffer("log_scale", log_scale)
            self.register_buffer("bias", bias)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor | None = None,
                scale: Scalar | None = None, bias: Scalar | None = None) -> torch.Tensor:
        return siglip_loss(img, txt, self.log_scale.exp() if scale is None else scale,
                           self.bias if bias is None else bias, labels=labels, normalize=self.normalize,
                           reduction=self.reduction, group=self.group, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, reduction={self.reduction!r}"


# ------------------------------------------------------------------ fake kernels and autograd

def _forward_fake(img, txt, labels, scale, bias, anchor_begin, anchor_end, row_chunk, col_chunk):
    n, acc = img.size(0), _engine.acc_dtype(img.dtype)
    saved = (img.new_empty(n, 3, dtype=acc), img.new_empty(n, 3, dtype=acc))
    return img.new_empty((), dtype=acc), *saved, img.new_empty((), dtype=acc), img.new_empty((), dtype=acc)


def _backward_fake(grad, img, txt, labels, scale, bias, row_saved, col_saved, anchor_begin, anchor_end, row_chunk,
                   col_chunk):
    return img.new_empty(img.shape), txt.new_empty(txt.shape)


def _setup_context(ctx, inputs, output):
    img, txt, labels, scale, bias, *anchors_and_chunks = inputs
    _, row_saved, col_saved, d_scale, d_bias = output
    ctx.mark_non_differentiable(row_saved, col_saved, d_scale, d_bias)
    ctx.save_for_backward(img, txt, labels, scale, bias, row_saved, col_saved, d_scale, d_bias)
    ctx.args = tuple(anchors_and_chunks)


def _backward(ops, ctx, grad):
    """(d img, d txt, None for labels, d scale, d bias): the GEMMs run only for the embeddings
    that need them; the scale's and bias's gradients are the forward's sums times ``grad``."""
    img, txt, labels, scale, bias, row_saved, col_saved, d_scale, d_bias = ctx.saved_tensors
    needs_img, needs_txt, _, needs_scale, needs_bias = ctx.needs_input_grad[:5]
    grads = (None, None)
    if needs_img or needs_txt:
        grads = ops.siglip_backward(grad, img, txt, labels, scale, bias, row_saved, col_saved, *ctx.args)
    d_scale = (grad * d_scale).to(scale.device, scale.dtype) if needs_scale else None
    d_bias = (grad * d_bias).to(bias.device, bias.dtype) if needs_bias else None
    return (*grads, None, d_scale, d_bias)


_engine.register_loss("siglip", forward_fake=_forward_fake, backward_fake=_backward_fake,
                      setup_context=_setup_context, backward=_backward)
