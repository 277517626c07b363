"""Library calls at the edges of the public API (issue 11): double backward is refused by
name, never answered with a silent wrong gradient; torch.compile(dynamic=True, fullgraph=True)
traces the argument checks; numpy scalars are numbers; meta tensors with labels trace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vse_cuda


def _inputs(count: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(count)]


LOSSES = {
    "triplet_loss-hardest": (2, lambda *x: vse_cuda.triplet_loss(*x)),
    "triplet_loss-topk": (2, lambda *x: vse_cuda.triplet_loss(*x, mining="topk", k=2)),
    "triplet_loss-all": (2, lambda *x: vse_cuda.triplet_loss(*x, mining="all")),
    "unified_loss": (2, lambda *x: vse_cuda.unified_loss(*x)),
    "quintuplet_loss": (6, lambda *x: vse_cuda.quintuplet_loss(*x)),
    "goal_loss": (2, lambda *x: vse_cuda.goal_loss(*x, triplet_weight="nca", pair_weight="sig_ms")),
}


@pytest.mark.parametrize("backend", ["cpu", "simt"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_double_backward_is_refused_by_name(name, backend):
    count, fn = LOSSES[name]
    with vse_cuda.use_backend(backend):
        leaves = _inputs(count)
        plain = torch.autograd.grad(fn(*leaves), leaves)
        first = torch.autograd.grad(fn(*leaves), leaves, create_graph=True)
        # The first-order gradients are right with create_graph=True too ...
        for got, want in zip(first, plain):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        # ... and differentiating them again raises, naming the loss.
        with pytest.raises(RuntimeError, match=rf"vse_cuda\.{name.split('-')[0]} does not support double backward"):
            sum(g.pow(2).sum() for g in first).backward()


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_traces_the_argument_checks(dynamic):
    def step(img, txt, margin, scale):
        return vse_cuda.triplet_loss(img, txt, margin=margin) + vse_cuda.unified_loss(img, txt, scale=scale)

    torch._dynamo.reset()
    compiled = torch.compile(step, dynamic=dynamic, fullgraph=True)
    for margin, scale in ((0.2, 20.0), (0.3, 10.0)):
        img, txt = (x.float() for x in _inputs(2))
        want = step(img, txt, margin, scale)
        torch.testing.assert_close(compiled(img, txt, margin, scale), want)
    # Our ValueError, not dynamo's "Unsupported": a symbolic number is checked by the op itself.
    with pytest.raises(ValueError, match="margin must be finite"):
        compiled(img, txt, float("nan"), 20.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        compiled(img, txt, 0.2, float("inf"))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name, call", [
    ("margin", lambda xs, v: vse_cuda.triplet_loss(xs[0], xs[1], margin=v, mining="all")),
    ("alpha", lambda xs, v: vse_cuda.quintuplet_loss(*xs, alpha=v)),
    ("tau", lambda xs, v: vse_cuda.goal_loss(xs[0], xs[1], tau=v)),
    ("bias", lambda xs, v: vse_cuda.siglip_loss(xs[0], xs[1], 10.0, v)),
])
def test_compiled_calls_check_their_numbers_in_the_op(name, call, dynamic):
    # Each op checks its numbers itself, so a compiled graph raises the wrappers' ValueError.
    xs = [x.detach().float() for x in _inputs(6)]
    torch._dynamo.reset()
    compiled = torch.compile(lambda v: call(xs, v), dynamic=dynamic, fullgraph=True)
    torch.testing.assert_close(compiled(1.0), call(xs, 1.0))
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        compiled(float("nan"))


@pytest.mark.parametrize("number", [np.float32(0.25), np.float64(0.25), np.float16(0.25), np.int64(0)])
def test_numpy_scalars_are_numbers(number):
    img, txt = _inputs(2)
    got = vse_cuda.triplet_loss(img, txt, margin=number)
    torch.testing.assert_close(got, vse_cuda.triplet_loss(img, txt, margin=float(number)), rtol=0, atol=0)
    module = vse_cuda.UnifiedLoss(margin=number, scale=np.float32(8.0))
    assert isinstance(module.margin, float) and isinstance(module.scale, float)


@pytest.mark.parametrize("flag", [True, np.bool_(True)])
def test_bools_are_not_numbers(flag):
    img, txt = _inputs(2)
    with pytest.raises(TypeError, match="margin must be a real number"):
        vse_cuda.triplet_loss(img, txt, margin=flag)


def test_topk_similar_on_meta_tensors_with_labels_gives_shapes():
    q, k = torch.empty(5, 3, device="meta"), torch.empty(7, 3, device="meta")
    labels_q, labels_k = torch.arange(5, device="meta"), torch.arange(7, device="meta")
    values, indices = vse_cuda.topk_similar(q, k, 2, query_labels=labels_q, key_labels=labels_k)
    assert values.shape == indices.shape == (5, 2) and indices.dtype == torch.int64
