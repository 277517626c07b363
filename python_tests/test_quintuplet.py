"""quintuplet_loss / QuintupletLoss (the chunked engine) against the oracle
vse_cuda.reference.quintuplet_loss: the loss and all six gradients in both weight modes, with
and without labels, both reductions, normalization, chunk sizes that do and do not divide N,
all dtypes; gradcheck, a surrogate for detached weights, opcheck, torch.compile, determinism,
special cases and bad input.

On simt (and cuda) this runs csrc/cuda/engine.cuh: topk_tile_kernel (the mined lists, k = 1),
gather_rows_kernel (sparse backward), and csrc/cuda/anchors.cuh: anchors_kernel over
QuintupletAnchors (each anchor's term and saved gradients)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import vse_cuda
from vse_cuda import reference as ref

from _loss_cases import (CUDA_BACKEND, LABEL_KINDS, assert_close, chunk_options, grid_inputs, loss_and_grads,
                         make_labels, per_backend, random_inputs)

LOSS_BACKENDS = ["cpu", "simt", CUDA_BACKEND]

SIZES = [(n, d) for n in (1, 2, 3, 17, 128) for d in (1, 3, 64)]
SIMT_SIZES = [(1, 1), (2, 3), (3, 64), (17, 3), (128, 64)]  # every N, every D
NAMES = ("img", "txt", "off_img", "off_txt", "img2", "txt2")


@pytest.fixture(params=LOSS_BACKENDS)
def backend(request) -> str:
    return request.param


def ours(on_backend, **options):
    def loss(*inputs):
        with on_backend():
            return vse_cuda.quintuplet_loss(*inputs, **options)
    return loss


def oracle(**options):
    options.pop("chunk_size", None)
    return lambda *inputs: ref.quintuplet_loss(*inputs, **options)


def assert_all_close(got, want, dtype, case="", scale=1.0, tol=None):
    """The loss and the six gradients of loss_and_grads."""
    assert_close(got[0], want[0], dtype, f"loss, {case}", tol=tol)
    for name, g, w in zip(NAMES, got[1], want[1]):
        assert_close(g, w, dtype, f"d {name}, {case}", scale, tol=tol)


@pytest.mark.parametrize("detach_weights", [False, True])
@pytest.mark.parametrize("label_kind", LABEL_KINDS)
@pytest.mark.parametrize("backend,n,d", per_backend(LOSS_BACKENDS, SIZES, SIMT_SIZES))
def test_matches_oracle_float64(backend, device, on_backend, n, d, label_kind, detach_weights):
    inputs = [x.to(device) for x in random_inputs(n, d, seed=100 * n + d, count=6)]
    labels = make_labels(label_kind, n)
    labels = None if labels is None else labels.to(device)
    for normalize in (False, True):
        for reduction in ("sum", "mean"):
            options = dict(labels=labels, normalize=normalize, reduction=reduction, detach_weights=detach_weights)
            want = loss_and_grads(oracle(**options), *inputs)
            for chunk in chunk_options(n) if reduction == "sum" else [None]:
                got = loss_and_grads(ours(on_backend, chunk_size=chunk, **options), *inputs)
                assert_all_close(got, want, torch.float64, f"normalize={normalize} reduction={reduction} chunk={chunk}")


@pytest.mark.parametrize("detach_weights", [False, True])
@pytest.mark.parametrize("label_kind", [None, "random", "pairs"])
def test_exact_ties_and_zero_hinges_match_the_oracle(backend, device, on_backend, label_kind, detach_weights):
    # Grid inputs: exactly tied negatives (the lowest index wins) and online and offline
    # hinges at exactly 0 (margins 1/4, 1/16), which must pass no gradient.
    inputs = [x.to(device) for x in grid_inputs(40, 3, seed=4, count=6)]
    labels = make_labels(label_kind, 40)
    labels = None if labels is None else labels.to(device)
    img, txt, _, off_txt, *_ = inputs
    S = img @ txt.T
    assert bool(((0.25 + S - S.diagonal()[:, None]) == 0).any()), "the case must contain online hinges at 0"
    assert bool(((0.0625 + (img * off_txt).sum(1) - S.diagonal()) == 0).any()), "and offline hinges at 0"
    options = dict(margin_online=0.25, margin_offline=0.0625, labels=labels, detach_weights=detach_weights)
    want = loss_and_grads(oracle(**options), *inputs)
    for chunk in (None, 7, 8):
        got = loss_and_grads(ours(on_backend, chunk_size=chunk, **options), *inputs)
        assert_all_close(got, want, torch.float64, f"chunk={chunk}", tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("label_kind", [None, "pairs"])
def test_low_precision_matches_oracle(backend, device, on_backend, dtype, label_kind):
    inputs = [x.to(device) for x in grid_inputs(37, 8, dtype, seed=2, count=6)]
    labels = make_labels(label_kind, 37)
    labels = None if labels is None else labels.to(device)
    for detach_weights in (False, True):
        for reduction in ("sum", "mean"):
            options = dict(margin_online=0.25, labels=labels, reduction=reduction, detach_weights=detach_weights)
            want = loss_and_grads(oracle(**options), *inputs)
            for chunk in (None, 8) if reduction == "sum" else [None]:
                got = loss_and_grads(ours(on_backend, chunk_size=chunk, **options), *inputs)
                assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
                assert_all_close(got, want, dtype, f"detach={detach_weights} reduction={reduction} chunk={chunk}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_random_normalized(backend, device, on_backend, dtype):
    inputs = [x.to(device) for x in random_inputs(128, 64, dtype, seed=8, count=6)]
    options = dict(labels=make_labels("random", 128).to(device), normalize=True)
    want = loss_and_grads(oracle(**options), *inputs)
    got = loss_and_grads(ours(on_backend, chunk_size=48, **options), *inputs)
    assert_all_close(got, want, dtype)


def test_column_tiles(backend, device, on_backend):
    # The op itself, with tiles narrower than N in both directions.
    inputs = [x.to(device) for x in random_inputs(23, 6, seed=1, count=6)]
    labels = make_labels("random", 23).to(device)

    def via_op(*xs):
        with on_backend():
            return vse_cuda._lib.ops(*xs).quintuplet_forward(*xs, labels, 0.2, 0.05, 0.3, 1.5, False, 0, xs[0].size(0),
                                                               5, 7)[0]

    got = loss_and_grads(via_op, *inputs)
    want = loss_and_grads(oracle(labels=labels, margin_offline=0.05), *inputs)
    assert_all_close(got, want, torch.float64)


def _separated(n, d, labels, normalize, m1, m2, gap=1e-3):
    """float64 inputs whose hinge arguments (online, of the hardest negatives, and offline) are
    all at least `gap` away from 0, with a gap between each row's and column's two hardest
    valid negatives, and active hinges of both kinds: finite differences cross no kink."""
    valid = ref.negative_mask(n, labels)
    for seed in range(1000):
        inputs = random_inputs(n, d, seed=seed, count=6)
        v, t, vo, to, v2, t2 = (F.normalize(x, dim=1) for x in inputs) if normalize else inputs
        S = v @ t.T
        p = S.diagonal()
        args, gaps = [], []
        for M, V in ((S, valid), (S.T, valid.T)):
            for i, (row, ok) in enumerate(zip(M, V)):
                values = torch.sort(row[ok], descending=True).values
                if values.numel() > 1:
                    gaps.append(values[0] - values[1])
                if values.numel() > 0:
                    args.append(m1 + values[0] - p[i])
        online = torch.stack(args)
        offline = torch.cat([m2 + s - p for s in ((v * to).sum(1), (vo * t).sum(1), (vo * to).sum(1), (v2 * t2).sum(1))])
        if (online.abs().min() > gap and offline.abs().min() > gap and torch.stack(gaps).min() > gap
                and (online > 0).any() and (offline > 0).any()):
            return inputs
    raise AssertionError("no separated inputs")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("labelled", [False, True])
def test_gradcheck(backend, device, on_backend, labelled, normalize):
    # detach_weights=False: the gradient is the true derivative of the loss, through ω and ν.
    labels = torch.tensor([0, 1, 0, 2, 3, 3, 4]) if labelled else None
    inputs = _separated(7, 4, labels, normalize, 0.2, 0.05)
    inputs = tuple(x.to(device).requires_grad_() for x in inputs)
    fn = ours(on_backend, margin_offline=0.05, labels=None if labels is None else labels.to(device),
              normalize=normalize, chunk_size=3)
    assert torch.autograd.gradcheck(fn, inputs)


def _surrogate(inputs, labels, normalize, m1, m2, alpha, beta, weights=None):
    """AOQ written from spec §3.3 with torch.max mining (the inputs are untied); with
    ``weights=(ω, ν)`` those are constants (detach_weights=True). Returns (loss, (ω, ν))."""
    v, t, vo, to, v2, t2 = (F.normalize(x, dim=1) for x in inputs) if normalize else inputs
    S = v @ t.T
    masked = S.masked_fill(~ref.negative_mask(S.size(0), labels), float("-inf"))
    p, u, w = S.diagonal(), masked.max(dim=1).values, masked.max(dim=0).values
    x, y, q, z = (v * to).sum(1), (vo * t).sum(1), (vo * to).sum(1), (v2 * t2).sum(1)
    omega, nu = (beta - (x - u) / alpha, beta - (y - w) / alpha) if weights is None else weights
    loss = (omega * torch.relu(m1 + u - p) + nu * torch.relu(m1 + w - p)
            + sum(torch.relu(m2 + s - p) for s in (x, y, q, z))).sum()
    return loss, (omega.detach(), nu.detach())


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("labelled", [False, True])
def test_detached_weights_are_constants(backend, device, on_backend, labelled, normalize):
    # detach_weights=True cannot be gradchecked (its gradient is not the derivative of the
    # loss): it equals the gradient of the surrogate whose ω, ν are constants evaluated at the
    # same point, and differs from the gradient through the weights; the loss is the same.
    labels = torch.tensor([0, 1, 0, 2, 3, 3, 4]) if labelled else None
    inputs = tuple(x.to(device) for x in _separated(7, 4, labels, normalize, 0.2, 0.05))
    labels = None if labels is None else labels.to(device)
    options = dict(margin_offline=0.05, labels=labels, normalize=normalize, chunk_size=3)
    _, weights = _surrogate(inputs, labels, normalize, 0.2, 0.05, 0.3, 1.5)
    constant = loss_and_grads(lambda *xs: _surrogate(xs, labels, normalize, 0.2, 0.05, 0.3, 1.5, weights)[0], *inputs)
    through = loss_and_grads(lambda *xs: _surrogate(xs, labels, normalize, 0.2, 0.05, 0.3, 1.5)[0], *inputs)
    detached = loss_and_grads(ours(on_backend, detach_weights=True, **options), *inputs)
    attached = loss_and_grads(ours(on_backend, **options), *inputs)
    assert_all_close(detached, constant, torch.float64, "detach_weights=True")
    assert_all_close(attached, through, torch.float64, "detach_weights=False")
    assert float(detached[0]) == float(attached[0])
    assert not torch.allclose(detached[1][0], attached[1][0])


@pytest.mark.parametrize("detach_weights", [False, True])
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("anchors", [(0, 9), (2, 7)], ids=["all_anchors", "some_anchors"])
def test_opcheck(backend, device, on_backend, labelled, detach_weights, anchors):
    inputs = [x.float().to(device).requires_grad_() for x in random_inputs(9, 5, seed=3, count=6)]
    labels = (make_labels("random", 9) if labelled else torch.empty(0, dtype=torch.int64)).to(device)
    with on_backend():
        op = vse_cuda._lib.ops(*inputs)
    args = (*inputs, labels, 0.2, 0.05, 0.3, 1.5, detach_weights, *anchors, 4, 6)
    torch.library.opcheck(op.quintuplet_forward.default, args)
    detached = [x.detach() for x in inputs]
    _, *saved = op.quintuplet_forward(*detached, *args[6:])
    torch.library.opcheck(op.quintuplet_backward.default, (torch.tensor(1.5, device=device), *detached, *saved))


def test_torch_compile_fullgraph_forward_and_backward():
    module = vse_cuda.QuintupletLoss(margin_offline=0.05, normalize=True, reduction="mean")
    compiled = torch.compile(module, fullgraph=True)
    inputs = random_inputs(12, 5, torch.float32, seed=6, count=6)
    labels = make_labels("pairs", 12)
    eager = loss_and_grads(lambda *xs: module(*xs, labels), *inputs)
    graph = loss_and_grads(lambda *xs: compiled(*xs, labels), *inputs)
    torch.testing.assert_close(graph, eager)


@pytest.mark.parametrize("detach_weights", [False, True])
def test_bitwise_deterministic(backend, device, on_backend, detach_weights):
    inputs = [x.to(device) for x in random_inputs(300, 32, torch.float32, seed=9, count=6)]
    fn = ours(on_backend, labels=make_labels("random", 300).to(device), chunk_size=64, detach_weights=detach_weights)
    first, second = loss_and_grads(fn, *inputs), loss_and_grads(fn, *inputs)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize("detach_weights", [False, True])
def test_simt_bitwise_deterministic_across_worker_counts(monkeypatch, detach_weights):
    # The executor runs blocks on VSE_SIMT_THREADS OS threads: 1 and 3 workers interleave the
    # blocks differently, and the results must not notice (no float atomics, fixed orders).
    inputs = random_inputs(150, 16, torch.float32, seed=10, count=6)
    labels = make_labels("random", 150)
    runs = []
    for workers in ("1", "3", "1"):
        monkeypatch.setenv("VSE_SIMT_THREADS", workers)
        fn = ours(lambda: vse_cuda.use_backend("simt"), labels=labels, chunk_size=40, detach_weights=detach_weights)
        runs.append(loss_and_grads(fn, *inputs))
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0])
        assert all(torch.equal(a, b) for a, b in zip(runs[0][1], other[1]))


@pytest.mark.parametrize("detach_weights", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_simt_kernels_match_the_cpu_kernels(dtype, detach_weights):
    # The ops themselves on 5 × 4 tiles (chunks 16 and 24 do not divide N = 75): the same
    # saved gradients (layout and values), index lists and input gradients as the CPU kernels.
    inputs = random_inputs(75, 16, dtype, seed=11, count=6)
    labels = make_labels("random", 75)
    grad = torch.tensor(1.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    results = []
    for ops in (torch.ops.vse_cuda, torch.ops.vse_simt):
        forward = ops.quintuplet_forward(*inputs, labels, 0.2, 0.05, 0.3, 1.5, detach_weights, 0, 75, 16, 24)
        results.append(forward + ops.quintuplet_backward(grad, *inputs, *forward[1:]))
    cpu, simt = results
    assert torch.equal(simt[2], cpu[2]) and torch.equal(simt[3], cpu[3])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for got, want in zip(simt, cpu):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_single_pair_has_only_offline_terms(backend, device, on_backend, dtype):
    # N = 1: no in-batch negative, so both online terms are 0 with no gradient (nothing flows
    # through ω, ν); the four offline terms still count.
    inputs = [x.to(device) for x in random_inputs(1, 4, dtype, count=6)]
    for normalize in (False, True):
        for detach_weights in (False, True):
            options = dict(margin_offline=3.0, normalize=normalize, detach_weights=detach_weights)
            got = loss_and_grads(ours(on_backend, **options), *inputs)
            want = loss_and_grads(oracle(**options), *inputs)
            assert got[0].dtype == dtype and float(got[0]) > 0
            assert_all_close(got, want, dtype)
    img, txt, off_img, off_txt, img2, txt2 = (x.double() for x in inputs)
    with on_backend():
        loss = vse_cuda.quintuplet_loss(img, txt, off_img, off_txt, img2, txt2, margin_offline=10.0)
    p = (img * txt).sum()
    offline = (img * off_txt).sum() + (off_img * txt).sum() + (off_img * off_txt).sum() + (img2 * txt2).sum()
    torch.testing.assert_close(loss, 40.0 + offline - 4 * p)


def test_all_same_label_keeps_only_offline_terms(backend, device, on_backend):
    inputs = [x.to(device) for x in random_inputs(6, 3, seed=5, count=6)]
    labels = torch.full((6,), 2, device=device)
    got = loss_and_grads(ours(on_backend, labels=labels, margin_offline=10.0, chunk_size=4), *inputs)
    img, txt, off_img, off_txt, img2, txt2 = inputs
    offline = loss_and_grads(
        lambda a, b, c, d, e, f: sum(torch.relu(10.0 + s - (a * b).sum(1)).sum()
                                     for s in ((a * d).sum(1), (c * b).sum(1), (c * d).sum(1), (e * f).sum(1))),
        *inputs)
    assert_all_close(got, offline, torch.float64)


@pytest.mark.parametrize("which", [0, 1, 3, 4])
def test_nan_input_gives_nan_loss(backend, device, on_backend, which):
    inputs = [x.to(device) for x in random_inputs(10, 4, seed=2, count=6)]
    inputs[which][3, 1] = float("nan")
    loss, grads = loss_and_grads(ours(on_backend, chunk_size=4), *inputs)
    assert torch.isnan(loss)
    assert all(g.shape == x.shape for g, x in zip(grads, inputs))
    with on_backend():
        _, _, row_index, col_index = vse_cuda._lib.ops(*inputs).quintuplet_forward(
            *inputs, torch.empty(0, dtype=torch.int64, device=device), 0.2, 0.0, 0.3, 1.5, False, 0, 10, 4, 10)
    assert bool(((row_index >= -1) & (row_index < 10)).all() and ((col_index >= -1) & (col_index < 10)).all())


def test_non_contiguous_inputs(backend, device, on_backend):
    # Strided column slices and transposed (column-major) views.
    g = torch.Generator().manual_seed(13)
    bases = [torch.randn(15, 12, generator=g, dtype=torch.float64).to(device) for _ in range(3)]
    bases += [torch.randn(6, 15, generator=g, dtype=torch.float64).to(device) for _ in range(3)]

    def views(xs):
        return [x[:, ::2] if x.size(0) == 15 else x.T for x in xs]

    assert not any(x.is_contiguous() for x in views(bases))
    got = loss_and_grads(lambda *xs: ours(on_backend, chunk_size=4)(*views(xs)), *bases)
    want = loss_and_grads(lambda *xs: oracle()(*views(xs)), *bases)
    assert_all_close(got, want, torch.float64)


def test_module_matches_the_function():
    inputs = random_inputs(11, 6, seed=12, count=6)
    labels = make_labels("pairs", 11)
    options = dict(margin_online=0.3, margin_offline=0.1, alpha=0.5, beta=1.2, detach_weights=True, normalize=True,
                   reduction="mean")
    module = vse_cuda.QuintupletLoss(**options)
    assert "detach_weights=True" in repr(module) and "alpha=0.5" in repr(module)
    assert torch.equal(module(*inputs, labels), vse_cuda.quintuplet_loss(*inputs, labels=labels, **options))
    assert torch.equal(vse_cuda.QuintupletLoss()(*inputs), vse_cuda.quintuplet_loss(*inputs))


def test_group_must_be_a_process_group():
    # group= itself is tested with several processes in test_distributed.py.
    inputs = random_inputs(3, 2, count=6)
    with pytest.raises(TypeError, match="ProcessGroup"):
        vse_cuda.quintuplet_loss(*inputs, group=object())
    with pytest.raises(TypeError, match="ProcessGroup"):
        vse_cuda.QuintupletLoss(group=object())


def test_memory_stays_within_chunks():
    # S would be 6000 × 6000 float32 = 137 MiB (the oracle keeps several); the engine holds one
    # 500-row tile (11 MiB) and O(N) state; the backward is sparse.
    script = textwrap.dedent("""
        import resource, torch, vse_cuda
        inputs = [torch.randn(6000, 16, requires_grad=True) for _ in range(6)]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for detach in (False, True):
            vse_cuda.quintuplet_loss(*inputs, detach_weights=detach, chunk_size=500).backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    extra_mib = float(out.stdout.strip().splitlines()[-1])
    assert extra_mib < 60, f"quintuplet_loss used {extra_mib:.0f} MiB extra; S alone would need 137 MiB"


def _call(**overrides):
    g = torch.Generator().manual_seed(0)
    args = {name: torch.randn(4, 5, generator=g) for name in NAMES}
    args.update(overrides)
    inputs = [args.pop(name) for name in NAMES]
    return vse_cuda.quintuplet_loss(*inputs, **args)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(img="img"), TypeError, "img"),
    (dict(off_img=None), TypeError, "off_img"),
    (dict(txt2=torch.randn(4, 5).long()), TypeError, "txt2"),
    (dict(off_txt=torch.randn(4, 5, 1)), ValueError, "off_txt"),
    (dict(off_img=torch.randn(3, 5)), ValueError, "off_img"),
    (dict(off_txt=torch.randn(5, 5)), ValueError, "off_txt"),
    (dict(img2=torch.randn(2, 5)), ValueError, "img2"),
    (dict(txt2=torch.randn(4, 6)), ValueError, "txt2"),
    (dict(img2=torch.randn(4, 4)), ValueError, "img2"),
    (dict(txt=torch.randn(4, 3)), ValueError, "txt"),
    (dict(off_txt=torch.randn(4, 5).double()), TypeError, "off_txt"),
    (dict(img2=torch.randn(4, 5).half()), TypeError, "img2"),
    (dict(txt2=torch.randn(4, 5, device="meta")), ValueError, "txt2"),
    (dict(**{name: torch.randn(0, 5) for name in NAMES}), ValueError, "N=0"),
    (dict(margin_online=float("nan")), ValueError, "margin_online"),
    (dict(margin_offline=float("inf")), ValueError, "margin_offline"),
    (dict(margin_offline="0"), TypeError, "margin_offline"),
    (dict(alpha=0.0), ValueError, "alpha"),
    (dict(alpha=-0.3), ValueError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha=float("inf")), ValueError, "alpha"),
    (dict(alpha="0.3"), TypeError, "alpha"),
    (dict(beta=float("-inf")), ValueError, "beta"),
    (dict(beta=None), TypeError, "beta"),
    (dict(detach_weights=1), TypeError, "detach_weights"),
    (dict(labels=torch.zeros(4)), TypeError, "labels"),
    (dict(labels=torch.zeros(3, dtype=torch.int64)), ValueError, "labels"),
    (dict(normalize="yes"), TypeError, "normalize"),
    (dict(reduction="none"), ValueError, "reduction"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
])
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(margin_online=float("inf")), ValueError, "margin_online"),
    (dict(margin_offline=float("nan")), ValueError, "margin_offline"),
    (dict(alpha=0), ValueError, "alpha"),
    (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(detach_weights="no"), TypeError, "detach_weights"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(normalize=1), TypeError, "normalize"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
])
def test_module_checks_its_keywords(kwargs, error, match):
    with pytest.raises(error, match=match):
        vse_cuda.QuintupletLoss(**kwargs)
