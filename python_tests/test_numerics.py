"""Numerics at the edges (DESIGN §6, issue 6 item 5), one table across every loss: inputs
whose similarities are all equal, margins of exactly 0 (every hinge sits on its kink), N = 1,
every pair sharing one label, all-zero embeddings under normalize, scale / tau 1000 (in every
dtype, bf16 and fp16 included), and NaN inputs. For each, on cpu and simt: the loss and the
gradients are finite wherever the exact result is, and equal the oracle's.

The expected values are the oracle's in float64 on the same inputs, rounded to the input
dtype: every input here is exact in all four dtypes and so is every similarity (multiples of
1/16 summed in any order), so mining decisions, ties and kinks agree exactly and half types
differ only by the final rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

import vse_cuda
from vse_cuda import reference as ref

from _loss_cases import TOL, assert_close, grid_inputs, loss_and_grads

BACKENDS = ["cpu", "simt"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

#: name -> (loss function name, options, number of embedding inputs). unified's gradient terms
#: are scale·p with p ≤ 1: at scale 1000 the tolerance is relative to that (see _tolerance).
LOSSES = {
    "triplet_hardest": ("triplet_loss", dict(mining="hardest", margin=0.2), 2),
    "triplet_hardest_m0": ("triplet_loss", dict(mining="hardest", margin=0.0), 2),
    "triplet_all_m0": ("triplet_loss", dict(mining="all", margin=0.0), 2),
    "triplet_top3_m0": ("triplet_loss", dict(mining="topk", k=3, margin=0.0), 2),
    "unified": ("unified_loss", dict(scale=20.0, margin=0.2), 2),
    "unified_m0": ("unified_loss", dict(scale=20.0, margin=0.0), 2),
    "unified_scale1000": ("unified_loss", dict(scale=1000.0, margin=0.1), 2),
    "quintuplet_m0": ("quintuplet_loss", dict(margin_online=0.0, margin_offline=0.0), 6),
    "quintuplet_detached": ("quintuplet_loss", dict(detach_weights=True), 6),
    "goal_nca_tau1000": ("goal_loss", dict(triplet_weight="nca", pair_weight="sig", tau=1000.0), 2),
    "goal_cir_sig_ms": ("goal_loss", dict(triplet_weight="cir", pair_weight="sig_ms"), 2),
    "goal_con_lin_ms": ("goal_loss", dict(triplet_weight="con", pair_weight="lin_ms"), 2),
}


def _one_vector(n: int, d: int, count: int) -> tuple[torch.Tensor, ...]:
    """Every row of every input the same vector: all similarities are equal (to 7/16)."""
    row = torch.tensor([0.25, -0.5, 0.0, 0.25, 0.5], dtype=torch.float64)[:d]
    return tuple(row.repeat(n, 1) for _ in range(count))


#: name -> (inputs(count) in float64, labels, options added to the loss's)
EDGES = {
    "all_similarities_equal": (lambda count: _one_vector(7, 5, count), None, {}),
    "all_similarities_equal_normalized": (lambda count: _one_vector(7, 5, count), None, dict(normalize=True)),
    "one_pair": (lambda count: grid_inputs(1, 4, count=count, seed=3), None, {}),
    "two_pairs": (lambda count: grid_inputs(2, 3, count=count, seed=4), None, {}),
    "every_pair_one_label": (lambda count: grid_inputs(6, 4, count=count, seed=5), torch.zeros(6, dtype=torch.int64), {}),
    "grid_ties_mean": (lambda count: grid_inputs(11, 3, count=count, seed=6), None, dict(reduction="mean")),
    "zero_embeddings_normalized": (lambda count: tuple(torch.zeros(5, 4, dtype=torch.float64) for _ in range(count)),
                                   None, dict(normalize=True)),
}


def _call(module, name: str, inputs, labels, options, backend: str | None = None):
    fn = getattr(module, name)
    if backend is None:
        return fn(*inputs, labels=labels, **options)
    with vse_cuda.use_backend(backend):
        return fn(*inputs, labels=labels, **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_is_finite_and_matches_the_oracle(backend, loss, edge, dtype):
    name, options, count = LOSSES[loss]
    make, labels, extra = EDGES[edge]
    options = {**options, **extra}
    inputs = make(count)
    want_loss, want_grads = loss_and_grads(lambda *x: _call(ref, name, x, labels, options), *inputs)
    assert torch.isfinite(want_loss) and all(torch.isfinite(g).all() for g in want_grads), "oracle not finite"

    loss_value, grads = loss_and_grads(lambda *x: _call(vse_cuda, name, x, labels, options, backend),
                                       *(x.to(dtype) for x in inputs))
    what = f"{loss} on {edge}, {dtype}"
    assert torch.isfinite(loss_value), what
    assert all(torch.isfinite(g).all() for g in grads), what
    scale, tol = _tolerance(options, dtype)
    assert_close(loss_value, want_loss.to(dtype), dtype, what, scale=scale, tol=tol)
    for i, (got, want) in enumerate(zip(grads, want_grads)):
        assert_close(got, want.to(dtype), dtype, f"{what}: gradient {i}", scale=scale, tol=tol)


def _tolerance(options: dict, dtype: torch.dtype) -> tuple[float, float]:
    """(magnitude, relative tolerance) of a comparison. At unified's scale γ the terms are
    γ·p_ij and the log-sum-exp is ≈ γ·m: one float32 rounding of it (2⁻²⁴ relative, 6e-6 at
    100) moves every p_ij by that much, so errors are relative to γ at 1e-4 (as in
    test_unified's scale-1000 test)."""
    gamma = options.get("scale", 1.0)
    if gamma <= 100:
        return 1.0, TOL[dtype]
    return gamma, TOL[dtype] if dtype == torch.float64 else max(TOL[dtype], 1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_negatives_gives_zero_loss_and_gradients(backend, loss, dtype):
    """N = 1, and N = 6 under one label: no anchor has a negative, so the in-batch terms are 0
    (the quintuplet's offline terms remain: they do not need in-batch negatives)."""
    name, options, count = LOSSES[loss]
    for n, labels in ((1, None), (6, torch.zeros(6, dtype=torch.int64))):
        inputs = tuple(x.to(dtype) for x in grid_inputs(n, 4, count=count, seed=n))
        if name == "quintuplet_loss":  # offline negatives equal to the anchors' pairs: those terms vanish too
            inputs = inputs[:2] + (inputs[0], inputs[1], inputs[0], inputs[1])
        loss_value, grads = loss_and_grads(lambda *x: _call(vse_cuda, name, x, labels, options, backend), *inputs)
        if name == "quintuplet_loss":
            want = ref.quintuplet_loss(*(x.double() for x in inputs), labels=labels, **options).to(dtype)
            assert_close(loss_value, want, dtype, f"{loss} at N={n}")
        else:
            assert loss_value.item() == 0.0, f"{loss} at N={n}"
            assert all(torch.count_nonzero(g) == 0 for g in grads), f"{loss} at N={n}"
        assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_gives_nan_loss_without_crashing(backend, loss):
    """A NaN in one embedding propagates to a NaN loss, as in the oracle; no out-of-range
    index, crash or hang on the way (mined indices are bounds-checked by the backward)."""
    name, options, count = LOSSES[loss]
    inputs = list(grid_inputs(9, 3, count=count, seed=7, dtype=torch.float32))
    inputs[0][4, 1] = math.nan
    want = _call(ref, name, inputs, None, options)
    loss_value, grads = loss_and_grads(lambda *x: _call(vse_cuda, name, x, None, options, backend), *inputs)
    assert torch.isnan(want) and torch.isnan(loss_value), loss
    assert all(g.shape == x.shape for g, x in zip(grads, inputs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_goal_sig_ms_unnormalized_float32_within_range(backend):
    """sig_ms's negative weight is w_n = 1/(e^{−b(N−λ)} + R⁻): e^{b(N−λ)} when the anchor's
    negative set is empty, which is the exact weight and is large but finite for unnormalized
    embeddings. With similarities up to about 6 (e^{55} ≈ 8e23) float32 holds it: the
    gradients are finite and equal the float64 oracle's. (Past b(N−λ) ≈ 88 the exact weight
    exceeds float32's range; the goal_loss docstring says so.)"""
    g = torch.Generator().manual_seed(11)
    img, txt = (torch.randn(40, 8, generator=g, dtype=torch.float64) * 0.65 for _ in range(2))
    assert 4.0 < float((img @ txt.T).max()) < 6.5
    options = dict(triplet_weight="nca", pair_weight="sig_ms")
    want_loss, want_grads = loss_and_grads(lambda a, b: ref.goal_loss(a, b, **options), img, txt)
    loss_value, grads = loss_and_grads(lambda a, b: _call(vse_cuda, "goal_loss", (a, b), None, options, backend),
                                       img.float(), txt.float())
    assert float(max(g.abs().max() for g in want_grads)) > 1e12  # the regime this test is about
    assert_close(loss_value, want_loss.float(), torch.float32, "loss")
    for got, want in zip(grads, want_grads):
        assert torch.isfinite(got).all()
        assert_close(got, want.float(), torch.float32, "gradient", tol=1e-4)
