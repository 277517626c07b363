"""Exact global negatives across ranks (DESIGN §3, §5): what crosses the wire is embeddings.

Every rank gathers the whole group's embeddings, O(N·D), and computes the loss terms of its
*own* pairs only: their image anchors against every caption of the group, their caption
anchors against every image. The engine sweeps those rows and those columns of the global
S = img·txtᵀ in chunks, so no rank ever holds an (N_local × N_global) similarity matrix, and
the sum of the ranks' losses is the single-process loss of the concatenated batch. The
backward of :func:`gather_with_grad` sums the ranks' gradients of the gathered embeddings, so
each rank's gradients equal the single-process gradients of its shard.

Uneven shard sizes work (the gather pads to the largest shard). Inputs are checked on every
rank against every other rank before any data moves, so a mismatch raises the same error on
all of them instead of leaving one waiting in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ._validation import check_group, check_strided

__all__ = ["gather_with_grad"]

# Dtypes by code in the metadata every rank exchanges (a tensor can carry only numbers).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64)


@dataclass(frozen=True)
class Shard:
    """This rank's place in the gathered batch: rows [begin, end) of ``total``."""

    sizes: tuple[int, ...]
    rank: int

    @property
    def begin(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def end(self) -> int:
        return self.begin + self.sizes[self.rank]

    @property
    def total(self) -> int:
        return sum(self.sizes)


def gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All ranks' ``x`` concatenated in rank order, ``[N_global, ...]``, differentiable.

    The backward reduce-scatters (sums) the gradient of the gathered tensor over the group,
    each rank receiving its own rows (half the bytes of an all-reduce of the whole gradient),
    so when every rank computes its loss from the gathered tensor,
    each rank's ``x`` receives the gradient of the *sum* of all ranks' losses — the
    single-process gradient of its shard. Shards may differ in their first dimension; the
    other dimensions, the dtype and the device type must match on every rank.

    Args:
        x: this rank's tensor, ``[n_rank, ...]``.
        group: the process group (default: the default group).

    Returns:
        ``[Σ n_rank, ...]`` tensor in ``x``'s dtype on ``x``'s device.

    Raises:
        TypeError: ``x`` is not a dense (strided) tensor (sparse COO/CSR, nested), on this
            rank alone and before any collective.
    """
    shard = exchange_shapes("x", x, group)
    return _GatherWithGrad.apply(x, shard, group)


def exchange_shapes(name: str, x: torch.Tensor, group: dist.ProcessGroup | None,
                    flags: Sequence[int] = ()) -> Shard:
    """Checks ``x`` against the other ranks' (trailing shape, dtype, device type and any
    ``flags`` must agree; the first dimension may differ) and returns this rank's shard.
    Raises the same ValueError on every rank when they disagree."""
    # Local checks first: each rank raises them alone, before any collective.
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    # The gather sends raw rows (all_gather of a flat buffer and split by the first dimension),
    # so sparse COO/CSR and nested tensors are refused by name before any collective. A nested
    # tensor may report layout torch.strided, hence the separate is_nested test.
    if x.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor")
    check_strided(name, x)
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the rows to gather), got a 0-d tensor")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; the gather supports {', '.join(map(str, _DTYPES))}")
    if x.device.type == "meta":  # holds no data to send; the metadata exchange would fail on .item()
        raise ValueError(f"{name} is on meta, but the gather sends data: use cpu or cuda tensors")
    check_group("group", group)
    rank = _rank_in(group)
    mine = [x.size(0), x.dim(), *x.shape[1:], _DTYPES.index(x.dtype), int(x.is_cuda), *flags]
    width = torch.tensor([len(mine)], dtype=torch.int64, device=x.device)
    widths = _all_gather(width, group)
    longest = int(max(w.item() for w in widths))
    meta = torch.full((longest,), -1, dtype=torch.int64, device=x.device)
    meta[: len(mine)] = torch.tensor(mine, dtype=torch.int64)
    metas = [m.tolist() for m in _all_gather(meta, group)]
    others = {tuple(m[1:]) for m in metas}
    if len(others) > 1:
        described = "; ".join(f"rank {r}: {_describe(m)}" for r, m in enumerate(metas))
        raise ValueError(f"{name} differs across the ranks of the group (only the first dimension may): {described}")
    return Shard(tuple(m[0] for m in metas), rank)


def gather(x: torch.Tensor, shard: Shard, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All ranks' ``x`` concatenated in rank order (no gradient); shapes from ``shard``."""
    largest = max(shard.sizes)
    padded = x.new_zeros((largest, *x.shape[1:]))
    padded[: x.size(0)] = x
    pieces = _all_gather(padded.contiguous(), group)
    return torch.cat([piece[:size] for piece, size in zip(pieces, shard.sizes)])


#: One uniform reduce-scatter: ``reduce_scatter_single`` where torch has it (2.14 deprecates
#: ``reduce_scatter_tensor`` for it), else ``reduce_scatter_tensor`` (older releases, e.g. 2.11).
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: Shard, group) -> torch.Tensor:
        ctx.shard, ctx.group = shard, group
        return gather(x, shard, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return reduce_scatter(grad, ctx.shard, ctx.group), None, None


def reduce_scatter(x: torch.Tensor, shard: Shard, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's rows of the sum over the group of every rank's ``x`` ([N_global, ...]): a
    reduce-scatter, half the bytes of an all-reduce, as every rank needs only its own rows.
    Shards are padded to the largest (as :func:`gather` pads them), so one uniform collective
    serves uneven shards on every backend."""
    largest, world = max(shard.sizes), len(shard.sizes)
    padded = x.new_zeros((world * largest, *x.shape[1:]))
    for r, rows in enumerate(x.split(list(shard.sizes))):
        padded[r * largest: r * largest + rows.size(0)] = rows
    out = x.new_empty((largest, *x.shape[1:]))
    _REDUCE_SCATTER(out, padded, op=dist.ReduceOp.SUM, group=group)
    return out[: shard.sizes[shard.rank]]


def _rank_in(group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("group= needs torch.distributed initialized (dist.init_process_group or torchrun)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return rank


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x, group=group)
    return pieces


def _describe(meta: list[int]) -> str:
    dims = meta[1]
    shape = [meta[0], *meta[2: 1 + dims]]
    dtype, cuda = meta[1 + dims], meta[2 + dims]
    flags = [f for f in meta[3 + dims:] if f >= 0]
    text = f"shape {tuple(shape)}, {_DTYPES[dtype]}, {'cuda' if cuda else 'cpu'}"
    return text + (f", options {flags}" if flags else "")
