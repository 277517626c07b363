"""Exact global negatives across ranks: vse_cuda.distributed and group= on the losses.

Single process: the ops' anchor ranges partition the loss and its gradients, on every
backend (on simt this runs the row-only and column-only sweeps of dense_rows_kernel,
dense_columns_kernel, dense_gradient_kernel and topk_tile_kernel of csrc/cuda).
Multi-process: 2 and 3 gloo ranks with uneven shards, one of them empty (torch.multiprocessing),
and 2 ranks through torchrun; the sum of the ranks' losses and the concatenation of their gradients equal
the single-process loss and gradients of the whole batch (float64, 1e-10); bad input raises on
every rank instead of hanging.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import vse_cuda

import _distributed_worker as worker
from _loss_cases import make_labels, random_inputs

TOL = dict(rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ anchor ranges, one process

def op_loss(name: str, ops, inputs, labels, begin: int, end: int):
    img, txt = inputs[:2]
    if name.startswith("unified"):
        label_positives = name == "unified_label_positives"
        return ops.unified_forward(img, txt, labels, torch.tensor(10.0), 0.2, False, label_positives, begin, end, 4,
                                   6)[0]
    if name == "quintuplet":
        return ops.quintuplet_forward(*inputs, labels, 0.2, 0.1, 0.3, 1.5, False, begin, end, 4, 6)[0]
    if name.startswith("goal"):
        pair_weight = name.split("_", 1)[1]
        return ops.goal_forward(img, txt, labels, "nca", pair_weight, 1.0, 2.0, 10.0, 0.5, begin, end, 4, 6)[0]
    mining, k = {"triplet_hardest": ("hardest", 1), "triplet_all": ("all", 1), "triplet_topk": ("topk", 3)}[name]
    return ops.triplet_forward(img, txt, labels, 0.2, mining, k, begin, end, 4, 6)[0]


@pytest.mark.parametrize("name,labelled", [
    *((name, labelled) for name in ("triplet_hardest", "triplet_all", "triplet_topk", "unified", "quintuplet",
                                    "goal_sig_ms", "goal_lin_ms") for labelled in (False, True)),
    ("unified_label_positives", True)])
def test_anchor_ranges_partition_the_loss(backend, on_backend, name, labelled):
    # [0, 5) + [5, 5) + [5, 13) + [13, 23) with tiles of 4 × 6 (neither divides a range).
    inputs = random_inputs(23, 5, seed=4, count=6)
    labels = make_labels("random", 23) if labelled else torch.empty(0, dtype=torch.int64)
    with on_backend():
        ops = vse_cuda._lib.ops(*inputs)
    pieces = []
    for begin, end in [(0, 23), (0, 5), (5, 5), (5, 13), (13, 23)]:
        leaves = [x.clone().requires_grad_() for x in inputs]
        with on_backend():
            loss = op_loss(name, ops, leaves, labels, begin, end)
            loss.backward()
        pieces.append((loss.detach(), *[torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]))
    whole, parts = pieces[0], pieces[1:]
    assert all(float(t.abs().sum()) == 0.0 for t in parts[1])  # no anchors, no loss, no gradient
    for got, want in zip((sum(p[s] for p in parts) for s in range(len(whole))), whole):
        torch.testing.assert_close(got, want, **TOL)


def test_anchor_range_out_of_bounds_is_refused():
    img, txt = random_inputs(5, 3, seed=0)
    with pytest.raises(RuntimeError, match="anchors"):
        torch.ops.vse_cuda.triplet_forward(img, txt, torch.empty(0, dtype=torch.int64), 0.2, "hardest", 1, 3, 6, 4, 4)


# ------------------------------------------------------------------------ several processes

def single_process_results(sizes: list[int]) -> dict:
    inputs, labels = worker.global_batch(sum(sizes))
    return {name: worker.compute(fn, options, inputs[:arity], labels if labelled else None, None)
            for name, (fn, options, labelled, arity) in worker.cases().items()}


def check_ranks_against_single_process(out_dir: Path, sizes: list[int]) -> None:
    ranks = [torch.load(out_dir / f"rank{r}.pt") for r in range(len(sizes))]
    for name, (loss, *grads) in single_process_results(sizes).items():
        torch.testing.assert_close(sum(r[name][0] for r in ranks), loss, **TOL, msg=f"{name}: loss")
        for s, grad in enumerate(grads, start=1):
            # An embedding's rows are split over the ranks; a replicated 0-dim option's
            # gradient (a learnable scale) is the sum of the ranks' (what DDP reduces).
            shares = [r[name][s] for r in ranks]
            got = sum(shares) if grad.dim() == 0 else torch.cat(shares)
            torch.testing.assert_close(got, grad, **TOL, msg=f"{name}: gradient of input {s - 1}")
    for rank, results in enumerate(ranks):
        errors = results["errors"]
        assert "only the first dimension" in errors["mismatched_d"], errors
        assert "options" in errors["labels_on_one_rank"], errors
        if rank != 0:
            assert "not a member" in errors["not_a_member"], errors


@pytest.mark.parametrize("sizes", [[5, 8], [1, 0, 6]], ids=["2_ranks", "3_ranks_one_empty"])
def test_ranks_sum_to_the_single_process_loss_and_gradients(tmp_path, sizes):
    mp.spawn(worker.run, args=(len(sizes), str(tmp_path / "store"), str(tmp_path), sizes), nprocs=len(sizes),
             join=True)
    check_ranks_against_single_process(tmp_path, sizes)


def test_torchrun(tmp_path):
    sizes = [4, 7]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(worker.__file__)), str(tmp_path), "--sizes", *map(str, sizes)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_ranks_against_single_process(tmp_path, sizes)
