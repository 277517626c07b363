"""Bitwise determinism of every loss on the CPU kernels: the same inputs give bitwise the same
loss and gradients run after run and with 1 or 2 threads (README guarantee; DESIGN §3: each
anchor's state sees its entries in a fixed order and no two threads write one output)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import sys, torch, vse_cuda
    torch.set_num_threads(int(sys.argv[1]))
    g = torch.Generator().manual_seed(0)
    # 300 pairs in 64-row chunks: several tiles, so the threads split every pass.
    inputs = [torch.nn.functional.normalize(torch.randn(300, 48, generator=g), dim=1) for _ in range(6)]
    labels = torch.randint(0, 120, (300,), generator=g)
    losses = {
        "triplet_hardest": lambda x: vse_cuda.triplet_loss(*x[:2], labels=labels, chunk_size=64),
        "triplet_all": lambda x: vse_cuda.triplet_loss(*x[:2], mining="all", chunk_size=64),
        "triplet_topk": lambda x: vse_cuda.triplet_loss(*x[:2], mining="topk", k=7, chunk_size=64),
        "unified": lambda x: vse_cuda.unified_loss(*x[:2], labels=labels, chunk_size=64),
        "quintuplet": lambda x: vse_cuda.quintuplet_loss(*x, chunk_size=64),
        "goal_sig_ms": lambda x: vse_cuda.goal_loss(*x[:2], triplet_weight="nca", pair_weight="sig_ms",
                                                    chunk_size=64),
        "goal_lin_ms": lambda x: vse_cuda.goal_loss(*x[:2], pair_weight="lin_ms", labels=labels, chunk_size=64),
    }
    out = {}
    for name, fn in losses.items():
        runs = []
        for _ in range(2):
            leaves = [x.clone().requires_grad_() for x in inputs]
            loss = fn(leaves)
            loss.backward()
            runs.append([loss.detach()] + [x.grad for x in leaves if x.grad is not None])
        out[name] = runs
    torch.save(out, sys.argv[2])
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, dict]:
    """Every loss computed twice in a process with 1 thread and in one with 2."""
    folder = tmp_path_factory.mktemp("determinism")
    out = {}
    for threads in (1, 2):
        path = folder / f"threads{threads}.pt"
        subprocess.run([sys.executable, "-c", SCRIPT, str(threads), str(path)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        out[threads] = torch.load(path)
    return out


def assert_bitwise(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w), f"differs by up to {float((g - w).abs().max()):.3g}"


NAMES = ["triplet_hardest", "triplet_all", "triplet_topk", "unified", "quintuplet", "goal_sig_ms", "goal_lin_ms"]


@pytest.mark.parametrize("name", NAMES)
def test_repeated_runs_are_bitwise_equal(results, name):
    for threads in (1, 2):
        first, second = results[threads][name]
        assert_bitwise(second, first)


@pytest.mark.parametrize("name", NAMES)
def test_one_and_two_threads_are_bitwise_equal(results, name):
    assert_bitwise(results[2][name][0], results[1][name][0])
