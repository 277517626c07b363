"""One rank of the multi-process tests of test_distributed.py: computes every loss case on its
shard of a seeded global batch with group=WORLD and saves the losses and the gradients of its
shard to OUT/rank{r}.pt. Started by torch.multiprocessing (`run`) or by torchrun (as a script).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import vse_cuda

D = 6


def cases() -> dict[str, tuple]:
    """name -> (loss function, keywords besides labels, labelled, number of embedding inputs)."""
    losses = {
        "triplet_hardest": (vse_cuda.triplet_loss, dict(mining="hardest"), 2),
        "triplet_all": (vse_cuda.triplet_loss, dict(mining="all", margin=0.3), 2),
        "triplet_topk": (vse_cuda.triplet_loss, dict(mining="topk", k=3), 2),
        "unified": (vse_cuda.unified_loss, dict(scale=10.0, margin=0.1), 2),
        "unified_learnable_scale": (vse_cuda.unified_loss, dict(scale=torch.tensor(10.0, dtype=torch.float64),
                                                                margin=0.1), 2),
        "siglip": (vse_cuda.siglip_loss, dict(scale=torch.tensor(5.0, dtype=torch.float64),
                                              bias=torch.tensor(-1.0, dtype=torch.float64)), 2),
        "quintuplet": (vse_cuda.quintuplet_loss, dict(margin_offline=0.1), 6),
        "quintuplet_detached": (vse_cuda.quintuplet_loss, dict(detach_weights=True), 6),
        "goal_nca_sig_ms": (vse_cuda.goal_loss, dict(triplet_weight="nca", pair_weight="sig_ms"), 2),
        "goal_cir_lin_ms": (vse_cuda.goal_loss, dict(triplet_weight="cir", pair_weight="lin_ms"), 2),
    }
    out = {}
    for name, (fn, options, arity) in losses.items():
        out[name] = (fn, options, False, arity)
        out[name + "_labels_mean_normalize"] = (fn, dict(options, reduction="mean", normalize=True), True, arity)
    # Positives from labels need labels: a labelled case only, with a learnable scale.
    out["unified_label_positives"] = (vse_cuda.unified_loss, dict(scale=torch.tensor(10.0, dtype=torch.float64),
                                                                  margin=0.1, label_positives=True), True, 2)
    return out


def global_batch(n: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Seeded float64 [n, D] inputs (img, txt: aligned pairs; then off_img, off_txt, img2,
    txt2) and labels with duplicates (two captions of one image)."""
    generator = torch.Generator().manual_seed(1234)
    img = torch.randn(n, D, generator=generator, dtype=torch.float64)
    txt = img + 0.7 * torch.randn(n, D, generator=generator, dtype=torch.float64)
    offline = tuple(torch.randn(n, D, generator=generator, dtype=torch.float64) for _ in range(4))
    labels = torch.randint(0, max(n // 2, 1), (n,), generator=generator)
    return (img, txt, *offline), labels


def compute(fn, options: dict, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor | None, group):
    """(loss, gradient of every input, then of every tensor option such as a learnable scale)."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    learnable = {k: v.clone().requires_grad_() for k, v in options.items() if isinstance(v, torch.Tensor)}
    loss = fn(*leaves, labels=labels, group=group, **dict(options, **learnable))
    loss.backward()
    return loss.detach(), *[x.grad for x in [*leaves, *learnable.values()]]


def rank_results(rank: int, sizes: list[int]) -> dict:
    inputs, labels = global_batch(sum(sizes))
    begin, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
    results = {}
    for name, (fn, options, labelled, arity) in cases().items():
        shard = tuple(x[begin:end] for x in inputs[:arity])
        shard_labels = labels[begin:end] if labelled else None
        results[name] = compute(fn, options, shard, shard_labels, dist.group.WORLD)
    results["errors"] = bad_input_errors(rank)
    return results


def bad_input_errors(rank: int) -> dict[str, str]:
    """The error each bad call raised on this rank (every rank must raise, none may hang)."""
    errors = {}
    width = D + rank  # the ranks disagree on D
    try:
        vse_cuda.triplet_loss(torch.randn(3, width), torch.randn(3, width), group=dist.group.WORLD)
    except ValueError as error:
        errors["mismatched_d"] = str(error)
    labelled = torch.arange(3) if rank == 0 else None  # labels on one rank only
    try:
        vse_cuda.unified_loss(torch.randn(3, D), torch.randn(3, D), labels=labelled, group=dist.group.WORLD)
    except ValueError as error:
        errors["labels_on_one_rank"] = str(error)
    alone = dist.new_group([0])  # every rank must take part in creating it
    if rank != 0:
        try:
            vse_cuda.triplet_loss(torch.randn(3, D), torch.randn(3, D), group=alone)
        except ValueError as error:
            errors["not_a_member"] = str(error)
    return errors


def run(rank: int, world: int, init_file: str, out_dir: str, sizes: list[int]) -> None:
    """torch.multiprocessing entry point."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(rank_results(rank, sizes), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main() -> int:
    """torchrun entry point: RANK / WORLD_SIZE from the environment."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--sizes", type=int, nargs="+", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        torch.save(rank_results(rank, args.sizes), Path(args.out_dir) / f"rank{rank}.pt")
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
