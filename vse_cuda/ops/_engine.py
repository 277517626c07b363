"""What every loss of the chunked engine (DESIGN §3) shares once its own arguments are
checked: the checks of the keywords every loss takes, normalization, the gather over the
process group, the chunk plan, the reduction, and the registration of each op's fake kernels
and autograd in both op namespaces (``torch.ops.vse_cuda`` and, when built, the test-only
``torch.ops.vse_simt``).

The engine's C++, by role: csrc/common/engine_math.h (the math every policy shares),
csrc/common/engine_driver.h (the host loop over tiles), csrc/common/tiles.h (the tile plan),
csrc/cpu/engine_passes.h, csrc/cuda/engine_passes.h (the per-tile passes), engine_kernels.cuh,
engine_launch.cuh and engine_mined.cu; the schemas are in csrc/ops.cpp.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .. import _lib, distributed
from .._chunking import plan_chunks
from .._validation import check_bool, check_choice, check_compatible, check_embeddings, check_group, check_int

REDUCTIONS = ("sum", "mean")
#: The engine ops' embedding arguments in order (the pair losses take the first two).
EMBEDDING_NAMES = ("img", "txt", "off_img", "off_txt", "img2", "txt2")


def check_pair(img: object, txt: object, *, group: object = None, **more: object) -> int:
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


def check_engine_options(normalize: object, reduction: object, group: object,
                         chunk_size: object) -> tuple[bool, str, object, int | None]:
    """The keywords every loss takes, checked: (normalize, reduction, group, chunk_size)."""
    check_bool("normalize", normalize)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    check_group("group", group)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    return normalize, reduction, group, chunk_size


class Batch(NamedTuple):
    """The op's inputs as the engine sees them (see :func:`gather`). A loss calls its op as
    ``batch.ops.X_forward(*batch.embeddings, batch.labels, *options, *batch.tiles)``."""

    ops: object
    embeddings: tuple[torch.Tensor, ...]
    labels: torch.Tensor
    #: (anchor_begin, anchor_end, row_chunk, col_chunk), the ops' trailing arguments.
    tiles: tuple[int, int, int, int]
    out_dtype: torch.dtype

    def reduce(self, total: torch.Tensor, reduction: str) -> torch.Tensor:
        """The op's summed loss ``total`` reduced over the group's N pairs, in the inputs' dtype."""
        n = self.embeddings[0].size(0)
        return (total / n if reduction == "mean" else total).to(self.out_dtype)


def gather(embeddings: tuple[torch.Tensor, ...], labels: torch.Tensor | None, group, normalize: bool,
           chunk_size: int | None) -> Batch:
    """Checked inputs made ready for an engine op: normalized, gathered across the group, the
    chunks planned, and the op namespace of the active backend chosen for them."""
    out_dtype = embeddings[0].dtype
    *embeddings, labels, anchors = _distribute(group, labels, *_normalized(normalize, *embeddings))
    n = embeddings[0].size(0)
    if n == 0:  # every rank of the group saw the same total
        raise ValueError("the group holds no pairs: every rank passed N=0")
    chunks = plan_chunks(n, n, embeddings[0].dtype, chunk_size)
    ops = _lib.ops(*embeddings, names=EMBEDDING_NAMES)
    labels = embeddings[0].new_empty(0, dtype=torch.int64) if labels is None else labels
    return Batch(ops, tuple(embeddings), labels, (*anchors, chunks.rows, chunks.cols), out_dtype)


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


def _normalized(normalize: bool, *embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """With ``normalize``, L2-normalized copies in the compute dtype (half types in float32,
    as the engine computes), so autograd takes the gradient through the normalization."""
    if normalize:
        dtype = acc_dtype(embeddings[0].dtype)
        embeddings = tuple(F.normalize(x.to(dtype), dim=1) for x in embeddings)
    return embeddings


def scalar_tensor(value: float | torch.Tensor) -> torch.Tensor:
    """An op's 0-dim tensor option (a learnable scale or bias): a tensor as given, so autograd
    reaches it; a number as a CPU float64 tensor (exact)."""
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the engine accumulates in (and returns its loss and saved state in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------ registration

def namespaces() -> tuple[str, ...]:
    """The op namespaces compiled into this build: the product's and the SIMT executor's."""
    return ("vse_cuda", "vse_simt") if "simt" in _lib.backends() else ("vse_cuda",)


def register_fake(op: str, fake: Callable) -> None:
    """Registers ``fake`` as the fake (meta) kernel of ``op`` in every namespace: the shapes
    that torch.compile and meta tensors trace with."""
    for namespace in namespaces():
        torch.library.register_fake(f"{namespace}::{op}", fake)


def register_loss(op: str, *, forward_fake: Callable, backward_fake: Callable, setup_context: Callable,
                  backward: Callable) -> None:
    """Registers ``{op}_forward`` and ``{op}_backward`` (the loss ``{op}_loss``) in every namespace.

    ``backward(ops, ctx, grad)`` gets the namespace the forward ran in and returns the
    gradients of the leading inputs (the embeddings, and a tensor option such as the unified
    loss's scale after the labels); the remaining inputs (labels, options, anchors, chunks)
    get None, as many as the op has. Only the loss output is differentiable:
    ``setup_context`` marks the saved state and index lists non-differentiable.
    """
    def setup(ctx, inputs, output):
        ctx.input_count = len(inputs)
        setup_context(ctx, inputs, output)

    register_fake(f"{op}_forward", forward_fake)
    register_fake(f"{op}_backward", backward_fake)
    for namespace in namespaces():
        torch.library.register_autograd(f"{namespace}::{op}_forward", _padded(backward, getattr(torch.ops, namespace)),
                                        setup_context=setup)
        # The backward ops are not differentiable themselves (mined losses gather through
        # saved indices, GOAL's weights are constants by design, the dense ones write GEMMs in
        # place). Registered so that create_graph=True gives gradients with a grad_fn, and
        # differentiating them raises here, naming the loss, instead of autograd returning
        # None (or failing in an at::mm out= call) with only a warning.
        torch.library.register_autograd(f"{namespace}::{op}_backward", _refuse_double_backward(f"{op}_loss"))


def _padded(backward: Callable, ops) -> Callable:
    """``backward`` bound to the namespace ``ops``, its embedding gradients followed by None
    for each further input of the forward (counted by ``setup`` in :func:`register_loss`)."""
    def padded(ctx, grad, *_):
        grads = backward(ops, ctx, grad)
        return (*grads, *[None] * (ctx.input_count - len(grads)))
    return padded


def _refuse_double_backward(loss_name: str) -> Callable:
    def backward(ctx, *grads):
        raise RuntimeError(f"vse_cuda.{loss_name} does not support double backward: its gradient (from "
                           f"torch.autograd.grad(..., create_graph=True)) cannot be differentiated again")
    return backward
